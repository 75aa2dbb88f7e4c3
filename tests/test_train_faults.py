"""Training survives the loss of a whole node: the run goes on on the remaining one.

It runs on a real two-node Ray cluster on loopback (tests/ray_cluster.py: 127.0.0.2, the
head, and 127.0.0.3, two CPUs each), the driver a `python -m scn_scale.train --ray-address`
process on the head, data and runs in a local directory every node sees. Tiny sets at 32 px,
2 ranks x 2 steps an epoch. The restarted run must go on from its last checkpoint with that
checkpoint's relabel table: the first epoch after the restart records `resumed_from` with the
epoch and table digest it started from. (A single SIGKILLed worker, checkpoint retention and
the clean-up of a kill's temporary files are tested in tests/test_train.py; a worker that
raises, on object storage, in tests/test_train_cluster.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from ray_cluster import RayCluster, ray_cluster
from scn_scale import checkpoint
from scn_scale.relabel_table import RelabelTable
from shards.cli import set_flags
from tests.conftest import write_shard_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("neutral", "happiness", "sadness", "surprise")

#: Holds one CPU of the head node until its process ends, so that the training workers
#: (one CPU each, packed on one node) must start on the other node.
BLOCK_HEAD = (
    "import sys, time, ray\n"
    "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "@ray.remote(num_cpus=1)\n"
    "class Blocker:\n"
    "    def node(self):\n"
    "        return ray.get_runtime_context().get_node_id()\n"
    "head = ray.get_runtime_context().get_node_id()  # a driver on this machine attaches to the head\n"
    "blocker = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()\n"
    "assert ray.get(blocker.node.remote()) == head\n"
    "print('READY', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(nodes=2, cpus_per_node=2, extra_env={"GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_shard_set(root / "train", [16] * 4, classes=CLASSES, seed=1)  # learnable: colour follows the label
    write_shard_set(root / "val", [8] * 2, classes=CLASSES, seed=2)
    return root


def _command(cluster: RayCluster, data: Path, out: Path, run_name: str, *settings: str) -> list[str]:
    """One start of a run, as a user starts it."""
    return [sys.executable, "-m", "scn_scale.train", "--ray-address", cluster.address,
            "--config", str(REPO / "cluster" / "configs" / "cpu-small.yaml"),
            *set_flags([f"train_shards={data / 'train'}", f"val_shards={data / 'val'}", f"out_dir={out}",
                        f"run_name={run_name}", "image_size=32", "batch_size=16", "loader_workers=0",
                        "scn.relabel_epoch=1", *settings])]


def _resumed(lines: list[dict]) -> list[tuple[int, dict]]:
    return [(line["epoch"], line["resumed_from"]) for line in lines if "resumed_from" in line]


def _digest(lines: list[dict], epoch: int) -> str:
    return next(line["table_digest"] for line in lines if line["epoch"] == epoch)


def test_a_stopped_node_resumes_on_the_remaining_one(cluster: RayCluster, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "node"
    worker_node = cluster.nodes[1]
    blocker = subprocess.Popen([sys.executable, "-c", BLOCK_HEAD, cluster.address], env=cluster.env,
                               stdout=subprocess.PIPE, text=True)
    trainer = None
    try:
        assert blocker.stdout.readline().strip() == "READY"  # the workers can only start on the other node
        with open(tmp_path / "node.log", "w") as log:
            trainer = subprocess.Popen(_command(cluster, data, tmp_path, "node", "epochs=4", "keep_checkpoints=0"),
                                       cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        # A checkpoint is where a restart begins once Ray's controller has registered it (in its snapshot
        # file), which comes a moment after the checkpoint's files: a node lost in between restarts the
        # run from the checkpoint before (here, from scratch).
        registered = run / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 400
        while not (registered.exists() and checkpoint.checkpoint_dir_name(1) in registered.read_text()):
            assert trainer.poll() is None and time.monotonic() < deadline, "the run ended or stalled before epoch 1"
            time.sleep(0.2)
        blocker.kill()  # the head's CPUs free for the restart
        os.killpg(worker_node.pid, signal.SIGKILL)  # the whole node at once: raylet, its workers, everything
        assert trainer.wait(timeout=540) == 0, (tmp_path / "node.log").read_text()[-5000:]
    finally:
        for proc in (blocker, trainer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = checkpoint.read_metrics(str(run))
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    (epoch, resumed), = _resumed(lines)  # one restart, from the checkpoint before the epoch the node died in
    assert resumed == {"epoch": epoch - 1, "table_digest": _digest(lines, epoch - 1)}
    table = RelabelTable.load(str(run / checkpoint.checkpoint_dir_name(epoch - 1) / checkpoint.TABLE_FILE))
    assert table.digest() == resumed["table_digest"]
    assert all(line["table_digests"] == [line["table_digest"]] * 2 for line in lines)
