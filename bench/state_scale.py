"""Per-epoch training state at web scale: the object path it replaced against the tensor path, on R gloo ranks.

What every rank does with per-sample state in one epoch, the model left out: per step,
look the batch's labels up in the relabel table and record alpha and relabel proposals;
at the epoch end, merge every rank's proposals into the table (digests checked) and
summarise alpha, split by noisy and clean samples. N samples with crawl-like keys, each
rank training N / R of them per epoch, 5% of them proposing a relabel, 30% noisy. Two
epochs run; the second, with the table already holding the first's entries, is measured.

- object path: the code before issue 18, kept below as the reference: a dict table,
  alpha as a dict by key gathered to rank 0 (`gather_object`), `Proposal` objects
  gathered with `all_gather_object`, the alpha statistics computed on rank 0;
- tensor path: scn_scale as it is: the manifest rows the shard reader gives each sample,
  turned into rows of the `SampleIndex` by `ManifestIndex.rows` (one array lookup, no
  hashing of keys), `sync.EpochSamples`, `sync.end_epoch` and `metrics.write_alpha_part`
  (each rank's own parquet part).

Per (path, N, R) it prints: seconds per epoch (the slowest rank), split into per-step
bookkeeping, the epoch-end exchange (merge, digests, alpha statistics) and, for the tensor
path, writing its per-sample alpha part (work the object path never did); bytes each rank
sent during the exchange (from /proc/self/io: everything gloo wrote to its sockets; the most
any rank sent); the epoch's peak memory per rank (RSS high-water mark during the measured
epoch over the RSS once the state was built; the largest rank and rank 0) and the RSS of
that state (index, table, noise mask); and the growth of time and peak memory from the row
before with the same path and R.

    python bench/state_scale.py [--samples 1000000 10000000] [--ranks 2 4] [--object-max 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from scn_scale import metrics, sync
from scn_scale.relabel import BatchProposals, Proposal, reduce_proposals
from scn_scale.relabel_table import ManifestIndex, RelabelTable

CLASSES = 8
BATCH = 256
PROPOSE = 0.05  # share of a rank's samples proposing a relabel each epoch
NOISY = 0.3
EPOCHS = 2  # the last one is measured


# The object path: scn_scale's relabel table and epoch end before issue 18, kept as the reference.


@dataclass(frozen=True)
class _Entry:
    original_label: int
    current_label: int
    epoch: int
    margin: float
    changes: int
    previous_label: int

    def first_seen_this_epoch(self) -> bool:
        return self.changes - (self.current_label != self.previous_label) == 0


class ObjectTable:
    """The dict-based RelabelTable: merge, apply, digest and to_pydict as they were."""

    COLUMNS = ("key", "original_label", "current_label", "epoch", "margin", "changes", "previous_label")

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def merge(self, proposals: Iterable[Proposal]) -> int:
        by_epoch: dict[int, list[Proposal]] = defaultdict(list)
        for p in proposals:
            if p.new_label == p.old_label:
                raise ValueError(f"proposal for {p.key!r} does not change its label ({p.old_label})")
            by_epoch[p.epoch].append(p)
        entries = dict(self._entries)
        for epoch in sorted(by_epoch):
            for key, p in sorted(reduce_proposals(by_epoch[epoch]).items()):
                if not (key in entries and p.epoch < entries[key].epoch):
                    entries[key] = _merge_one(entries.get(key), p)
        changed = sum(
            1
            for key, entry in entries.items()
            if entry.current_label != (self._entries[key].current_label if key in self._entries else entry.original_label)
        )
        self._entries = entries
        return changed

    def apply(self, keys: Sequence[str], labels: Tensor) -> Tensor:
        values = labels.tolist()
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                values[i] = entry.current_label
        return torch.tensor(values, dtype=labels.dtype, device=labels.device)

    def digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self._entries):
            e = self._entries[key]
            fields = (key, e.original_label, e.current_label, e.epoch, e.margin.hex(), e.changes, e.previous_label)
            h.update(("\t".join(map(str, fields)) + "\n").encode())
        return h.hexdigest()

    def to_pydict(self) -> dict[str, list]:
        keys = sorted(self._entries)
        columns: dict[str, list] = {"key": keys}
        for name in self.COLUMNS[1:]:
            columns[name] = [getattr(self._entries[k], name) for k in keys]
        return columns


def _merge_one(entry: _Entry | None, p: Proposal) -> _Entry:
    old, new, margin, epoch = int(p.old_label), int(p.new_label), float(p.margin), int(p.epoch)
    if entry is None:
        return _Entry(old, new, epoch, margin, 1, old)
    if epoch > entry.epoch:
        changes = entry.changes + (new != entry.current_label)
        return _Entry(entry.original_label, new, epoch, margin, changes, entry.current_label)
    first = entry.first_seen_this_epoch()
    held = (entry.margin, -entry.current_label, -entry.previous_label if first else 0)
    if (margin, -new, -old if first else 0) <= held:
        return entry
    base = entry.changes - (entry.current_label != entry.previous_label)
    previous = old if first else entry.previous_label
    original = old if first else entry.original_label
    return _Entry(original, new, epoch, margin, base + (new != previous), previous)


class ObjectPath:
    """Per step: dict lookups, a dict of alpha by key, Proposal objects; at the epoch end: object collectives."""

    def __init__(self, sim: Simulation) -> None:
        self.table = ObjectTable()
        # As TrainLabels held it on rank 0: the set of noisy keys.
        self.noisy = set(sim.keys[sim.noisy_positions].astype(str).tolist()) if sim.rank == 0 else set()

    def start(self, epoch: int) -> None:
        self.epoch, self.alpha, self.proposals = epoch, {}, []

    def step(self, batch: Batch) -> Tensor:
        labels = self.table.apply(batch.keys, batch.labels)
        self.alpha.update(zip(batch.keys, batch.alpha.tolist()))
        return labels

    def proposals_of(self, batch: Batch, labels: Tensor, fire: Tensor, new: Tensor, margin: Tensor) -> None:
        old, new_labels, margins = labels.tolist(), new.tolist(), margin.tolist()
        self.proposals.extend(
            Proposal(batch.keys[i], old[i], new_labels[i], margins[i], self.epoch) for i in torch.nonzero(fire).flatten().tolist()
        )

    def end(self, sim: Simulation) -> dict:
        local = sorted(reduce_proposals(self.proposals).values(), key=lambda p: p.key)
        gathered = [p for part in sync.all_gather_object(local) for p in part]
        changed = self.table.merge(gathered)
        digests = sync.all_gather_object(self.table.digest())
        assert len(set(digests)) == 1
        alphas = sync.gather_object(self.alpha)
        if sim.rank == 0:
            merged = {k: v for part in alphas for k, v in part.items()}
            keys = sorted(merged)
            noisy = np.array([k in self.noisy for k in keys])
            metrics.alpha_stats(np.array([merged[k] for k in keys]), noisy)
            table = self.table.to_pydict()
            sum(o != c for o, c in zip(table["original_label"], table["current_label"]))
        return {"changed": changed}


# The tensor path: scn_scale as the trainer uses it.


class TensorPath:
    def __init__(self, sim: Simulation) -> None:
        self.manifest = ManifestIndex.build(sim.keys)
        self.index, manifest_rows = self.manifest.index, self.manifest.of_manifest_row
        self.table = RelabelTable(self.index)
        self.noisy = torch.zeros(len(self.index), dtype=torch.bool)
        self.noisy[torch.from_numpy(manifest_rows[sim.noisy_positions])] = True
        self.run_dir = sim.out

    def start(self, epoch: int) -> None:
        self.samples = sync.EpochSamples(epoch)

    def step(self, batch: Batch) -> Tensor:
        self.rows = self.manifest.rows(batch.rows, batch.keys)  # the reader gives manifest rows
        return self.table.labels_at(self.rows, batch.labels)

    def proposals_of(self, batch: Batch, labels: Tensor, fire: Tensor, new: Tensor, margin: Tensor) -> None:
        self.samples.add(self.rows, batch.alpha, BatchProposals(batch.keys, self.samples.epoch, fire, labels, new, margin))

    def end(self, sim: Simulation) -> dict:
        end = sync.end_epoch(self.table, self.samples, self.noisy)
        if sim.rank == 0:
            end.alpha.stats()
            self.table.relabeled()
        return {"changed": end.changed, "end": end}

    def write_part(self, sim: Simulation, epoch: int, end: sync.EpochEnd) -> None:
        metrics.write_alpha_part(self.run_dir, epoch, sim.rank, self.index.keys_at(end.rows), end.sample_alpha)


# The simulation around either path.


def make_keys(n: int) -> np.ndarray:
    """n distinct keys like a crawl's ("web-" and 24 hex digits), in no particular order."""
    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: a bijection mod 2**64
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.full((n, 28), ord("0"), dtype=np.uint8)
    out[:, :4] = np.frombuffer(b"web-", dtype=np.uint8)
    for i in range(16):
        out[:, 27 - i] = digits[((x >> np.uint64(4 * i)) & np.uint64(15)).astype(np.intp)]
    return out.view("S28").ravel()


@dataclass
class Batch:
    keys: list[str]
    rows: Tensor  # manifest rows, as shards.reader gives them
    labels: Tensor
    alpha: Tensor


@dataclass
class Simulation:
    rank: int
    world: int
    keys: np.ndarray  # every sample's key, manifest order
    noisy_positions: np.ndarray
    out: str

    def batches(self, epoch: int, labels: np.ndarray) -> Iterator[tuple[Batch, np.random.Generator]]:
        """This rank's samples in a shuffled order, a batch at a time, with the rank's random stream."""
        rng = np.random.default_rng([self.rank, epoch])
        mine = np.arange(self.rank, len(self.keys), self.world)
        order = mine[rng.permutation(len(mine))]
        for start in range(0, len(order), BATCH):
            positions = order[start : start + BATCH]
            batch = Batch(self.keys[positions].astype(str).tolist(), torch.from_numpy(positions),
                          torch.from_numpy(labels[positions]), torch.rand(len(positions)))
            yield batch, rng


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bytes_written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


class PeakRSS:
    """The RSS high-water mark while the block runs (Linux resets it on writing 5 to /proc/self/clear_refs)."""

    def __enter__(self) -> PeakRSS:
        Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        with open("/proc/self/status") as f:
            self.peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def run_rank(rank: int, world: int, port: int, path: str, n: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(rank)
        keys = make_keys(n)
        labels = np.random.default_rng(1).integers(0, CLASSES, n)
        noisy_positions = np.flatnonzero(np.random.default_rng(2).random(n) < NOISY)
        sim = Simulation(rank, world, keys, noisy_positions, out)
        before_state = rss()
        state = ObjectPath(sim) if path == "object" else TensorPath(sim)
        after_state = rss()
        for epoch in range(1, EPOCHS + 1):
            dist.barrier()
            with PeakRSS() as memory:
                state.start(epoch)
                step_time = 0.0
                for batch, rng in sim.batches(epoch, labels):
                    fire = torch.from_numpy(rng.random(len(batch.keys)) < PROPOSE)
                    offset = torch.from_numpy(rng.integers(1, CLASSES, len(batch.keys)))
                    margin = torch.from_numpy(rng.uniform(0.2, 1.0, len(batch.keys)))
                    tick = time.perf_counter()
                    current = state.step(batch)
                    new = (current + offset) % CLASSES  # the model's argmax, not bookkeeping
                    step_time, tick = step_time + time.perf_counter() - tick, time.perf_counter()
                    state.proposals_of(batch, current, fire, new, margin)
                    step_time += time.perf_counter() - tick
                tick, sent = time.perf_counter(), bytes_written()
                result = state.end(sim)
                sent, end_time, tick = bytes_written() - sent, time.perf_counter() - tick, time.perf_counter()
                if path == "tensor":  # its own file, never through rank 0; file bytes are not network bytes
                    state.write_part(sim, epoch, result["end"])
                part_time = time.perf_counter() - tick
        record = {
            "step_s": step_time, "end_s": end_time, "part_s": part_time, "sent": sent,
            "peak": memory.peak - after_state, "state": after_state - before_state, "changed": result["changed"],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def measure(path: str, n: int, world: int) -> dict:
    """One (path, N, R) run in fresh processes; the slowest rank's times, the largest per-rank bytes and memory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        mp.spawn(run_rank, args=(world, port, path, n, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "path": path, "samples": n, "ranks": world,
        "epoch_s": max(r["step_s"] + r["end_s"] + r["part_s"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks),
        "end_s": max(r["end_s"] for r in ranks),
        "part_s": max(r["part_s"] for r in ranks),
        "sent": max(r["sent"] for r in ranks),
        "peak": max(r["peak"] for r in ranks),
        "peak_rank0": ranks[0]["peak"],
        "state": max(r["state"] for r in ranks),
        "changed": ranks[0]["changed"],
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--paths", nargs="+", default=["object", "tensor"], choices=["object", "tensor"])
    parser.add_argument("--object-max", type=int, default=1_000_000,
                        help="largest N for the object path (rank 0 unpickles every alpha: about 1 GiB per million samples)")
    args = parser.parse_args(argv)
    header = (
        "| path | N | R | samples/rank | epoch s | steps s | exchange s | alpha part s | sent MiB/rank | "
        "epoch peak MiB/rank (rank 0) | state MiB/rank | changed | growth (time, peak) |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows: list[dict] = []
    for world in args.ranks:
        for path in args.paths:
            for n in sorted(args.samples):
                if path == "object" and n > args.object_max:
                    continue
                row = measure(path, n, world)
                prev = next((r for r in reversed(rows) if r["path"] == path and r["ranks"] == world), None)
                growth = "" if prev is None else (
                    f"x{n / prev['samples']:.0f} N: time x{row['epoch_s'] / prev['epoch_s']:.1f}, peak x{row['peak'] / max(prev['peak'], 1):.1f}"
                )
                rows.append(row)
                print(
                    f"| {path} | {n:,} | {world} | {n // world:,} | {row['epoch_s']:.2f} | {row['step_s']:.2f} | {row['end_s']:.2f} | {row['part_s']:.2f} | "
                    f"{_mb(row['sent'])} | {_mb(row['peak'])} ({_mb(row['peak_rank0'])}) | {_mb(row['state'])} | {row['changed']:,} | {growth} |",
                    flush=True,
                )
    for world in args.ranks:
        for n in args.samples:
            pair = {r["path"]: r for r in rows if r["samples"] == n and r["ranks"] == world}
            if len(pair) == 2:
                assert pair["object"]["changed"] == pair["tensor"]["changed"], "the two paths disagree"
                old, new = pair["object"], pair["tensor"]
                print(f"N={n:,}, R={world}: tensor path {old['end_s'] / new['end_s']:.1f}x faster at the epoch-end exchange, "
                      f"{old['epoch_s'] / new['epoch_s']:.1f}x over the whole epoch's state work; "
                      f"{old['peak_rank0'] / max(new['peak_rank0'], 1):.1f}x less epoch peak memory on rank 0")
    # The headline (the contract of every bench: a last line starting with "ratio"): the whole epoch's state work,
    # object path over tensor path, at the largest N both ran; the target is >= 10 at 1 million samples.
    both = [r for r in rows if r["path"] == "tensor" and any(
        o["path"] == "object" and o["samples"] == r["samples"] and o["ranks"] == r["ranks"] for o in rows)]
    if both:
        new = max(both, key=lambda r: (r["samples"], r["ranks"]))
        old = next(o for o in rows if o["path"] == "object" and o["samples"] == new["samples"] and o["ranks"] == new["ranks"])
        print(f"ratio {old['epoch_s'] / new['epoch_s']:.2f} (object path / tensor path, epoch state seconds, "
              f"N={new['samples']:,}, R={new['ranks']}; target >= 10 at 1,000,000)")
    else:
        print("ratio - (needs both paths at one N: --paths object tensor)")


if __name__ == "__main__":
    main()
