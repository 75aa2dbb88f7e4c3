"""What SCN must agree on across data-parallel ranks: the ranked alpha, the relabel table and the epoch's statistics.

Rank regularization over the global batch needs every rank's alpha in one tensor, with
gradient flowing only into this rank's own part (the others are constants here; their
owners back-propagate them). Relabel proposals are gathered at each epoch end and merged
into one table on every rank; a digest gathered from every rank then proves the tables
are identical, because a rank training on different labels would drift silently.
Without an initialized process group (one process) everything is local.

At web scale (10 million samples, 64 ranks) nothing per sample travels as a Python
object and nothing per sample goes to rank 0: an epoch's proposals travel as fixed-size
int64 rows (16 bytes a proposal, every rank receives every proposal, since every rank
holds the whole table), the alpha distribution as a histogram of fixed size, and
per-sample alpha stays on its rank, which writes it to its own parquet part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from scn_scale.metrics import AlphaHistogram
from scn_scale.relabel import BatchProposals, ProposalRows
from scn_scale.relabel_table import RelabelTable

T = TypeVar("T")


class TableMismatchError(RuntimeError):
    """Ranks hold different relabel tables: they would train on different labels."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: NCCL (GPU runs) only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank: for small objects (one per rank)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if _distributed():
        dist.barrier()


def gather_object(obj: T) -> list[T] | None:
    """Every rank's `obj` in rank order on rank 0 (None elsewhere): for payloads only rank 0 reads."""
    if not _distributed():
        return [obj]
    rank, world = dist.get_rank(), dist.get_world_size()
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_alpha(alpha: Tensor) -> tuple[Tensor, int]:
    """(alpha of every rank concatenated in rank order, where this rank's part starts).

    Only this rank's slice is `alpha` itself (float32, keeping its graph); the others are
    detached copies, so the rank loss computed over the result back-propagates into local
    samples only. `scn_scale.loss.scn_loss` rescales that gradient for the averaging that
    data parallelism applies. Batches must have the same size on every rank (the shard
    reader guarantees it).
    """
    alpha = alpha.float()
    if not _distributed():
        return alpha, 0
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [torch.empty_like(alpha) for _ in range(world)]
    dist.all_gather(parts, alpha.detach().contiguous())
    parts[rank] = alpha
    return torch.cat(parts), rank * alpha.shape[0]


def average_buffers(module: nn.Module) -> None:
    """Give every rank the mean of the ranks' floating-point buffers (BatchNorm's running mean and
    variance); integer buffers (BatchNorm's batch counter) come from rank 0. Collective.

    DeepSpeed keeps parameters equal across ranks but not buffers: each rank's running
    statistics follow its own batches, so without this every rank would validate a slightly
    different model, none of them the saved one. Averaging, rather than broadcasting rank 0's,
    keeps what every rank saw (each holds an average over 1/world of the data); the variance so
    averaged leaves out the spread of the ranks' means, which is small when every rank's batches
    mix the whole set (shards.reader). timm's `distribute_bn` (reduce=True) does the same.
    One all-reduce of all buffers at once: ResNet-18 has 9,600 floats of them.
    """
    if not _distributed():
        return
    world = dist.get_world_size()
    floats = [b for b in module.buffers() if b.is_floating_point()]
    others = [b for b in module.buffers() if not b.is_floating_point()]
    if floats:
        flat = torch.cat([b.detach().double().flatten() for b in floats])  # float64: the mean of equal values is exact
        dist.all_reduce(flat)
        flat /= world
        for b, part in zip(floats, flat.split([b.numel() for b in floats])):
            b.copy_(part.view_as(b))
    for b in others:
        dist.broadcast(b, src=0)


def module_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of `module`, in state-dict order: equal digests, equal models."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_digests(table: RelabelTable) -> list[str]:
    """The table digest of every rank (rank order); raises TableMismatchError on every rank if any differs from rank 0's."""
    digests = all_gather_object(table.digest())
    wrong = [r for r, d in enumerate(digests) if d != digests[0]]
    if wrong:
        raise TableMismatchError(
            f"relabel table differs from rank 0's ({digests[0][:12]}) on ranks {wrong}: "
            + ", ".join(f"rank {r}: {digests[r][:12]}" for r in wrong)
        )
    return digests


def _encode(p: ProposalRows) -> Tensor:
    """[P, 2] int64: row << 32 | new label << 16 | old label, and the margin's float64 bits (exact)."""
    if len(p) and (p.rows.max() >= 2**31 or torch.cat([p.old_label, p.new_label]).max() >= 2**16):
        raise ValueError("proposal rows must be below 2**31 and labels below 2**16 to travel between ranks")
    head = (p.rows << 32) | (p.new_label << 16) | p.old_label
    return torch.stack([head, p.margin.view(torch.int64)], dim=1)


def _decode(wire: Tensor, epoch: int) -> ProposalRows:
    head = wire[:, 0]
    return ProposalRows(epoch, head >> 32, head & 0xFFFF, (head >> 16) & 0xFFFF, wire[:, 1].contiguous().view(torch.float64))


def all_gather_proposals(proposals: ProposalRows) -> ProposalRows:
    """Every rank's proposals of one epoch, on every rank: two all_gathers of fixed-size int64 tensors.

    Ranks hold different numbers of proposals; each pads to the largest count (gathered first).
    """
    if not _distributed():
        return proposals
    device, world = _collective_device(), dist.get_world_size()
    count = torch.tensor([len(proposals)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), 2, dtype=torch.int64, device=device)
    padded[: len(proposals)] = _encode(proposals).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return _decode(torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu(), proposals.epoch)


def merge_proposals(table: RelabelTable, proposals: ProposalRows, confirm: int = 1) -> tuple[int, list[str]]:
    """Merge this epoch's proposals of every rank into `table`; return (labels changed, digests per rank).

    Each rank first reduces its own proposals to one per row (rollover revisits samples
    within an epoch), then every rank merges every rank's, `confirm` epochs running
    (`RelabelTable.merge_rows`). The table's merge rule does not depend on the order, so
    any mismatch found afterwards is a real fault, not a tie broken differently.
    """
    changed = table.merge_rows(all_gather_proposals(proposals.reduced()), confirm)
    return changed, check_digests(table)


def all_reduce_alpha(hist: AlphaHistogram) -> AlphaHistogram:
    """The histogram of every rank's samples, on every rank: three all_reduces of ALPHA_BINS-sized tensors."""
    if not _distributed():
        return hist
    device, groups = _collective_device(), len(hist.moments)
    sums = torch.cat([hist.counts, hist.moments], dim=1).to(device)
    low, high = hist.low.to(device), hist.high.to(device)
    dist.all_reduce(sums)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    sums = sums.cpu()
    return AlphaHistogram(sums[:, : -hist.moments.shape[1]], sums[:, -hist.moments.shape[1] :], low.cpu(), high.cpu())


class EpochSamples:
    """One rank's per-sample record of an epoch: the rows it trained, their alpha and its relabel proposals.

    Alpha and proposals stay on the device where the step made them (appending costs no
    host synchronisation); rows are host arrays (from the manifest rows the reader gives).
    Everything comes back to the host once, at the epoch end.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self._rows: list[np.ndarray] = []
        self._alpha: list[Tensor] = []
        self._proposal_rows: list[np.ndarray] = []
        self._proposals: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # fire, old label, new label, margin

    def add(self, rows: np.ndarray, alpha: Tensor, proposals: BatchProposals | None) -> None:
        self._rows.append(rows)
        self._alpha.append(alpha.detach().float())
        if proposals is not None:  # every sample of the batch, fired or not: compacting would wait for the device
            self._proposal_rows.append(rows)
            p = proposals
            self._proposals.append((p.fire, p.old_label.to(torch.int16), p.new_label.to(torch.int16), p.margin))

    def state_dict(self) -> dict[str, Tensor | int]:
        """Everything recorded so far as host tensors (one copy back from the device): a mid-epoch checkpoint's part."""
        rows = torch.from_numpy(np.concatenate(self._rows)) if self._rows else torch.empty(0, dtype=torch.int64)
        alpha = torch.cat(self._alpha).cpu() if self._alpha else torch.empty(0)
        state: dict[str, Tensor | int] = {"epoch": self.epoch, "rows": rows, "alpha": alpha}
        if self._proposals:
            fire, old, new, margin = (torch.cat(column).cpu() for column in zip(*self._proposals))
            state.update(proposal_rows=torch.from_numpy(np.concatenate(self._proposal_rows)), fire=fire, old=old, new=new, margin=margin)
        return state

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochSamples:
        """The record `state_dict` gave, on `device`, to go on adding to."""
        samples = cls(int(state["epoch"]))
        if len(state["rows"]):
            samples._rows, samples._alpha = [state["rows"].numpy()], [state["alpha"].to(device)]
        if "fire" in state:
            samples._proposal_rows = [state["proposal_rows"].numpy()]
            samples._proposals = [tuple(state[k].to(device) for k in ("fire", "old", "new", "margin"))]
        return samples

    def last_visits(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, alpha) of every sample trained this epoch, each once: its alpha at its last visit."""
        if not self._rows:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        rows = np.concatenate(self._rows)
        alpha = torch.cat(self._alpha).cpu().numpy()
        # The last position of each row, in one pass over dense rows (np.unique would sort them).
        last = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
        np.maximum.at(last, rows, np.arange(len(rows)))
        unique = np.flatnonzero(last >= 0)
        return unique, alpha[last[unique]]

    def proposals(self) -> ProposalRows:
        """The epoch's fired proposals, keyed by row (not yet reduced: a row may appear more than once)."""
        if not self._proposals:
            return ProposalRows.of(self.epoch, [], [], [], [])
        fire, old, new, margin = (torch.cat(column).cpu() for column in zip(*self._proposals))
        every = ProposalRows(self.epoch, torch.from_numpy(np.concatenate(self._proposal_rows)), old.long(), new.long(), margin.double())
        return every.select(fire)


@dataclass
class EpochEnd:
    """What the epoch-end exchange leaves on a rank."""

    changed: int  # labels the merge changed
    digests: list[str]  # the table digest of every rank, rank order
    alpha: AlphaHistogram  # every rank's samples
    rows: np.ndarray  # this rank's samples (each once) and their alpha: for its own parquet part
    sample_alpha: np.ndarray


def end_epoch(table: RelabelTable, samples: EpochSamples, noisy: Tensor | None, confirm: int = 1) -> EpochEnd:
    """The state every rank exchanges at an epoch end: proposals merged into the table (digests
    checked) and the alpha histogram (split by `noisy`, a mask by row, when the truth is known).

    Collective: every rank calls it. What travels does not grow with the samples a rank
    trained, except the proposals every rank needs to update its copy of the table.
    """
    changed, digests = merge_proposals(table, samples.proposals(), confirm)
    rows, alpha = samples.last_visits()
    hist = AlphaHistogram.of(torch.from_numpy(alpha), None if noisy is None else noisy[torch.from_numpy(rows)])
    return EpochEnd(changed, digests, all_reduce_alpha(hist), rows, alpha)
