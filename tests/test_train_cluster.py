"""`ray job submit` to a real two-node Ray cluster on loopback: 2 workers, one per node, DeepSpeed ZeRO-2 on CPU.

Both nodes are `ray start` processes on this machine (tests/ray_cluster.py: 127.0.0.2 and
127.0.0.3) with one CPU each, so the two training workers (one CPU each) must land on
different nodes. The test stops only the Ray processes it started.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from scn_scale import checkpoint
from scn_scale.noise import make_noise, save_overrides
from scn_scale.relabel_table import RelabelTable
from scn_scale.weights import load_model_file
from shards import read_manifest
from ray_cluster import ray_cluster
from tests.conftest import write_shard_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CLASSES = ("neutral", "happiness", "sadness", "surprise")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, dict]]:
    # A throwaway cluster: no token auth (ray_cluster), gloo on loopback, no 30 s drain when stopped.
    extra = {"GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with ray_cluster(nodes=2, cpus_per_node=1, extra_env=extra) as c:
        yield c.dashboard_url, c.env


def test_ray_job_submit_two_nodes_zero2(cluster: tuple[str, dict], tmp_path: Path) -> None:
    address, env = cluster
    write_shard_set(tmp_path / "train", [16] * 4, classes=CLASSES, seed=1)
    write_shard_set(tmp_path / "val", [8] * 2, classes=CLASSES, seed=2)
    manifest = read_manifest(str(tmp_path / "train"), columns=["key", "label"]).to_pydict()
    save_overrides(make_noise(manifest["key"], manifest["label"], len(CLASSES), 0.3, seed=0), str(tmp_path / "noise.parquet"))
    run_name = f"cluster-{uuid.uuid4().hex[:8]}"
    cmd = [
        RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env", "cluster/runtime-env.yaml",
        "--submission-id", run_name, "--",
        sys.executable, "-m", "scn_scale.train", "--config", "cluster/configs/cpu-small.yaml",
        f"train_shards={tmp_path / 'train'}", f"val_shards={tmp_path / 'val'}", f"label_overrides={tmp_path / 'noise.parquet'}",
        f"out_dir={tmp_path / 'runs'}", f"run_name={run_name}", "num_workers=2", "deepspeed=cluster/deepspeed/zero2-cpu.json",
        "image_size=32", "batch_size=8", "epochs=2", "scn.relabel_epoch=1",
    ]
    job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and f"Job '{run_name}' succeeded" in output, output[-5000:]

    run = tmp_path / "runs" / run_name
    lines = checkpoint.read_metrics(str(run))
    assert [m["epoch"] for m in lines] == [1, 2]
    for line in lines:  # the relabel table was identical on both ranks after every epoch
        assert len(line["table_digests"]) == 2 and len(set(line["table_digests"])) == 1
    assert lines[-1]["relabels_total"] > 0

    final = run / checkpoint.checkpoint_dir_name(2)
    table = RelabelTable.load(str(final / checkpoint.TABLE_FILE))
    assert table.digest() == lines[-1]["table_digest"]
    assert sorted(p.name for p in (final / checkpoint.DEEPSPEED_DIR / checkpoint.deepspeed_tag(2)).iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    _, classes, extra = load_model_file(str(final / checkpoint.MODEL_FILE))
    assert classes == list(CLASSES) and extra["epoch"] == 2
