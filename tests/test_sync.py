"""Relabel-table synchronization and the global alpha gather, on a real two-process gloo group on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scn_scale import sync
from scn_scale.loss import rank_regularization
from scn_scale.relabel import Proposal
from scn_scale.relabel_table import RelabelTable

WORLD = 2
N = 6  # samples per rank


def _alpha_leaf(rank: int) -> torch.Tensor:
    """The same global alpha on every process, so each rank's slice can be compared with one process's."""
    torch.manual_seed(0)
    return torch.rand(WORLD * N, dtype=torch.float64)[rank * N : (rank + 1) * N].float().requires_grad_()


def _proposals(rank: int) -> list[Proposal]:
    """Rank 0 and rank 1 both propose for key "b" (different margins) and rank 0 twice for "a" (rollover)."""
    if rank == 0:
        return [Proposal("a", 0, 1, 0.30, 3), Proposal("a", 0, 2, 0.50, 3), Proposal("b", 1, 2, 0.25, 3)]
    return [Proposal("b", 1, 3, 0.40, 3), Proposal("c", 2, 0, 0.90, 3)]


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

        table = RelabelTable()
        changed, digests = sync.merge_proposals(table, _proposals(rank))
        result["changed"], result["digests"] = changed, digests
        result["labels"] = {k: table.get(k) for k in "abc"}

        if rank == 1:
            table.merge([Proposal("d", 0, 1, 0.5, 4)])  # this rank alone drifts
        try:
            sync.check_digests(table)
            result["mismatch"] = None
        except sync.TableMismatchError as e:
            result["mismatch"] = str(e)
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
    table = RelabelTable()
    changed, digests = sync.merge_proposals(table, _proposals(0))
    assert changed == 2 and digests == [table.digest()]


def test_without_a_process_group_everything_is_local() -> None:
    # A fresh process: the test session itself may hold a one-rank group (conftest.one_rank).
    mp.spawn(_local_checks, nprocs=1)
