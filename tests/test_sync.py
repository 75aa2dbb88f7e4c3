"""Relabel-table synchronization, the global alpha gather and the epoch-end exchange, on real two-process gloo groups on 127.0.0.1."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scn_scale import metrics, sync
from scn_scale.loss import rank_regularization
from scn_scale.relabel import BatchProposals, Proposal, ProposalRows
from scn_scale.relabel_table import RelabelTable, SampleIndex

WORLD = 2
N = 6  # samples per rank
INDEX, _ = SampleIndex.build("abcd")  # the training set's keys, the same on every rank


def _alpha_leaf(rank: int) -> torch.Tensor:
    """The same global alpha on every process, so each rank's slice can be compared with one process's."""
    torch.manual_seed(0)
    return torch.rand(WORLD * N, dtype=torch.float64)[rank * N : (rank + 1) * N].float().requires_grad_()


def _proposals(rank: int) -> list[Proposal]:
    """Rank 0 and rank 1 both propose for key "b" (different margins) and rank 0 twice for "a" (rollover)."""
    if rank == 0:
        return [Proposal("a", 0, 1, 0.30, 3), Proposal("a", 0, 2, 0.50, 3), Proposal("b", 1, 2, 0.25, 3)]
    return [Proposal("b", 1, 3, 0.40, 3), Proposal("c", 2, 0, 0.90, 3)]


def _rows(proposals: list[Proposal]) -> ProposalRows:
    """One epoch's proposals as the trainer hands them over: keyed by row of the sample index."""
    return ProposalRows.of(
        proposals[0].epoch, INDEX.lookup([p.key for p in proposals]), [p.old_label for p in proposals],
        [p.new_label for p in proposals], [p.margin for p in proposals],
    )


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result: dict = {}
        alpha = _alpha_leaf(rank)
        ranked, offset = sync.gather_alpha(alpha)
        rank_regularization(ranked, beta=0.7, delta1=2.0).backward()
        result["ranked"] = ranked.tolist()
        result["offset"] = offset
        result["grad"] = alpha.grad.tolist()

        table = RelabelTable(INDEX)
        changed, digests = sync.merge_proposals(table, _rows(_proposals(rank)))
        result["changed"], result["digests"] = changed, digests
        result["labels"] = {k: table.get(k) for k in "abc"}

        if rank == 1:
            table.merge([Proposal("d", 0, 1, 0.5, 4)])  # this rank alone drifts
        try:
            sync.check_digests(table)
            result["mismatch"] = None
        except sync.TableMismatchError as e:
            result["mismatch"] = str(e)

        bn = torch.nn.BatchNorm1d(3)  # each rank's running statistics follow its own batch
        bn(torch.full((4, 3), float(rank + 1)) + torch.arange(4.0)[:, None] * (rank + 1))
        result["digest_before"] = sync.module_digest(bn)
        sync.average_buffers(bn)
        result["bn"] = {k: v.tolist() for k, v in bn.state_dict().items()}
        result["digest_after"] = sync.module_digest(bn)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_gather_alpha_concatenates_in_rank_order_with_local_gradient_only(two_ranks: list[dict]) -> None:
    full = torch.cat([_alpha_leaf(r).detach() for r in range(WORLD)])
    leaf = full.clone().requires_grad_()
    rank_regularization(leaf, beta=0.7, delta1=2.0).backward()  # one process ranking the whole batch
    for rank, result in enumerate(two_ranks):
        assert result["offset"] == rank * N
        assert torch.allclose(torch.tensor(result["ranked"]), full)
        # This rank's gradient is exactly one process's gradient for its slice: nothing lost, nothing
        # flowing into the other ranks' constants.
        assert torch.allclose(torch.tensor(result["grad"]), leaf.grad[rank * N : (rank + 1) * N])


def test_merge_gives_one_table_on_every_rank(two_ranks: list[dict]) -> None:
    alone = RelabelTable()
    alone.merge(_proposals(0) + _proposals(1))
    for result in two_ranks:
        assert result["digests"] == [alone.digest()] * WORLD
        assert result["changed"] == 3
        # Within an epoch the larger margin wins, whichever rank proposed it.
        assert result["labels"] == {"a": 2, "b": 3, "c": 0}


def test_a_drifting_rank_stops_every_rank(two_ranks: list[dict]) -> None:
    for result in two_ranks:
        assert result["mismatch"] is not None and "differs from rank 0's" in result["mismatch"]
        assert "ranks [1]" in result["mismatch"]


def _local_checks(_: int) -> None:
    assert not dist.is_initialized()
    alpha = torch.rand(4, requires_grad=True)
    ranked, offset = sync.gather_alpha(alpha)
    assert offset == 0 and torch.equal(ranked, alpha)
    table = RelabelTable(INDEX)
    changed, digests = sync.merge_proposals(table, _rows(_proposals(0)))
    assert changed == 2 and digests == [table.digest()]


def test_batchnorm_statistics_are_averaged_into_one_model(two_ranks: list[dict]) -> None:
    """Rank r saw the batch (r + 1) * [1, 2, 3, 4]: running mean 0.1 * 2.5 (r + 1), running var
    0.9 + 0.1 * 5/3 (r + 1)^2 (unbiased); after the average both ranks hold the means of the two."""
    assert two_ranks[0]["digest_before"] != two_ranks[1]["digest_before"]
    assert two_ranks[0]["digest_after"] == two_ranks[1]["digest_after"]
    assert two_ranks[0]["bn"] == two_ranks[1]["bn"]
    var = [0.9 + 0.1 * 5 / 3 * (r + 1) ** 2 for r in range(WORLD)]
    assert two_ranks[0]["bn"]["running_mean"] == pytest.approx([0.1 * 2.5 * 1.5] * 3)
    assert two_ranks[0]["bn"]["running_var"] == pytest.approx([sum(var) / WORLD] * 3)
    assert two_ranks[0]["bn"]["num_batches_tracked"] == 1


def test_without_a_process_group_everything_is_local() -> None:
    # A fresh process: the test session itself may hold a one-rank group (conftest.one_rank).
    mp.spawn(_local_checks, nprocs=1)


# The epoch-end exchange at two sizes: rank 0 must receive nothing per sample.

SIZES = (200, 20_000)  # samples per rank
BATCHES = 10  # one proposal each, at every size
COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "scatter", "scatter_object_list", "recv", "irecv",
)


def _payload(value: object) -> int:
    """Bytes of a collective's tensors and object lists (an upper bound of what the rank received)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, list):
        return sum(_payload(v) if isinstance(v, torch.Tensor) else len(pickle.dumps(v)) for v in value)
    return 0


def _count_collectives(received: list[int]) -> None:
    """Record the payload of every torch.distributed collective this process calls from now on."""
    for name in COLLECTIVES:
        def counted(*args, _original=getattr(dist, name), **kwargs):
            result = _original(*args, **kwargs)
            received.append(sum(_payload(a) for a in (*args, *kwargs.values())))
            return result

        setattr(dist, name, counted)


def _sample_alpha(rank: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(1000 * rank + n))


def _end_epoch_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        received: list[int] = []
        _count_collectives(received)
        result = {}
        for n in SIZES:
            index, _ = SampleIndex.build([f"s{i:06d}" for i in range(WORLD * n)])
            rows, alpha = np.arange(rank, WORLD * n, WORLD), _sample_alpha(rank, n)
            samples = sync.EpochSamples(epoch=3)
            for batch in np.array_split(np.arange(n), BATCHES):
                fire = torch.zeros(len(batch), dtype=torch.bool)
                fire[0] = True
                labels = torch.zeros(len(batch), dtype=torch.long)
                keys = [f"s{i:06d}" for i in rows[batch]]
                margin = torch.full((len(batch),), 0.5, dtype=torch.float64)
                samples.add(rows[batch], alpha[batch], BatchProposals(keys, 3, fire, labels, labels + 1, margin))
            noisy = torch.from_numpy(np.arange(WORLD * n) % 3 == 0)
            before = len(received)
            end = sync.end_epoch(RelabelTable(index), samples, noisy)
            metrics.write_alpha_part(f"{out}/run{n}", 3, rank, index.keys_at(end.rows), end.sample_alpha)
            result[n] = {"received": sum(received[before:]), "changed": end.changed, "alpha": end.alpha.stats()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def epoch_ends(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("end")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_end_epoch_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_rank_0_never_receives_per_sample_alpha(epoch_ends: tuple[Path, list[dict]]) -> None:
    _, results = epoch_ends
    small, large = (str(n) for n in SIZES)
    for rank, result in enumerate(results):
        # A hundredfold more samples per rank: not one byte more through any collective, on any rank;
        # and less than one rank's own float32 alpha in all.
        assert result[large]["received"] == result[small]["received"], rank
        assert result[large]["received"] < 4 * SIZES[1]
        assert result[large]["changed"] == WORLD * BATCHES  # the proposals did travel
    alpha = torch.cat([_sample_alpha(r, SIZES[1]) for r in range(WORLD)]).double()
    stats = results[0][large]["alpha"]
    assert stats["n"] == WORLD * SIZES[1] and stats["noisy"]["n"] + stats["clean"]["n"] == stats["n"]
    assert stats["mean"] == pytest.approx(float(alpha.mean())) and stats["max"] == pytest.approx(float(alpha.max()))


def test_each_rank_writes_its_own_alpha_part(epoch_ends: tuple[Path, list[dict]]) -> None:
    out, _ = epoch_ends
    n = SIZES[0]
    epoch_dir = out / f"run{n}" / metrics.ALPHA_DIR / "epoch_0003"
    assert sorted(p.name for p in epoch_dir.iterdir()) == [f"rank_{r:04d}.parquet" for r in range(WORLD)]
    for rank in range(WORLD):
        part = pq.read_table(epoch_dir / f"rank_{rank:04d}.parquet").to_pydict()
        assert part["key"] == [f"s{i:06d}" for i in range(rank, WORLD * n, WORLD)]
        assert np.allclose(part["alpha"], _sample_alpha(rank, n).numpy())
    assert pq.read_table(epoch_dir).num_rows == WORLD * n  # the directory reads as one table


def test_an_epochs_record_saved_mid_way_goes_on_as_if_never_saved() -> None:
    """EpochSamples.state_dict / from_state (a mid-epoch checkpoint): the resumed record ends with the same
    last visits and proposals as the uninterrupted one, revisits across the cut included."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        rows = torch.randint(0, 20, (4,), generator=g).numpy()
        margin = torch.rand(4, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (4,), generator=g)
        batches.append((rows, torch.rand(4, generator=g), BatchProposals([str(r) for r in rows], 3, margin > 0.5, labels, (labels + 1) % 5, margin)))
    whole = sync.EpochSamples(3)
    first = sync.EpochSamples(3)
    for i, (rows, alpha, proposals) in enumerate(batches):
        whole.add(rows, alpha, proposals)
        if i < 3:
            first.add(rows, alpha, proposals)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = sync.EpochSamples.from_state(state, torch.device("cpu"))
    for rows, alpha, proposals in batches[3:]:
        resumed.add(rows, alpha, proposals)
    for got, want in zip(resumed.last_visits(), whole.last_visits()):
        assert np.array_equal(got, want)
    got, want = resumed.proposals(), whole.proposals()
    assert len(want) > 0 and all(torch.equal(a, b) for a, b in zip(
        (got.rows, got.old_label, got.new_label, got.margin), (want.rows, want.old_label, want.new_label, want.margin)))
    assert sync.EpochSamples.from_state(sync.EpochSamples(1).state_dict(), torch.device("cpu")).last_visits()[0].size == 0
