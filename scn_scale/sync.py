"""What SCN must agree on across data-parallel ranks: the ranked alpha and the relabel table.

Rank regularization over the global batch needs every rank's alpha in one tensor, with
gradient flowing only into this rank's own part (the others are constants here; their
owners back-propagate them). Relabel proposals are gathered at each epoch end and merged
in rank order into one table on every rank; a digest gathered from every rank then proves
the tables are identical, because a rank training on different labels would drift
silently. Without an initialized process group (one process) everything is local.

Object collectives (`all_gather_object`) carry up to about 1e5 proposals an epoch
comfortably (docs/distributed_notes.md); beyond that a dense label table indexed by a
global sample id with all_reduce(MAX) would be the next step.
"""

from __future__ import annotations

from typing import Any, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from scn_scale.relabel import Proposal, reduce_proposals
from scn_scale.relabel_table import RelabelTable

T = TypeVar("T")


class TableMismatchError(RuntimeError):
    """Ranks hold different relabel tables: they would train on different labels."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def merge_proposals(table: RelabelTable, proposals: Iterable[Proposal]) -> tuple[int, list[str]]:
    """Merge this epoch's proposals of every rank into `table`; return (labels changed, digests per rank).

    Each rank first reduces its own proposals to one per key (rollover revisits samples
    within an epoch), then every rank merges the same gathered list in rank order. The
    table's merge rule does not depend on that order, so any mismatch found afterwards
    is a real fault, not a tie broken differently.
    """
    local = sorted(reduce_proposals(proposals).values(), key=lambda p: p.key)
    gathered = [p for part in all_gather_object(local) for p in part]
    changed = table.merge(gathered)
    return changed, check_digests(table)
