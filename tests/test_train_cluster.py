"""`ray job submit` to a real two-node Ray cluster on loopback: 2 workers, one per node, DeepSpeed ZeRO-2 on CPU;
one worker raises mid-run and the job goes on from its checkpoint in the bucket.

Both nodes are `ray start` processes on this machine (tests/ray_cluster.py: 127.0.0.2 and
127.0.0.3) with one CPU each, so the two training workers (one CPU each) must land on
different nodes. Shards, label table and checkpoints live in a bucket of a loopback S3 server
(the `s3` fixture), the shared storage a real cluster uses. The test stops only the Ray
processes it started.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from scn_scale import checkpoint
from scn_scale.config import ModelConfig
from scn_scale.evaluate import EvalConfig, evaluate
from scn_scale.model import build_model
from scn_scale.noise import make_noise, save_overrides
from scn_scale.relabel_table import RelabelTable
from scn_scale.train import main as train_main
from scn_scale.weights import load_model_file, load_weights
from shards import read_manifest
from shards.cli import set_flags
from ray_cluster import ray_cluster
from tests.conftest import S3, write_shard_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CLASSES = ("neutral", "happiness", "sadness", "surprise")


@pytest.fixture(scope="module")
def cluster(s3: S3) -> Iterator[tuple[str, dict]]:
    # A throwaway cluster: no token auth (ray_cluster), gloo on loopback, every process pointed at the S3 server.
    extra = {"GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", **s3.env}
    with ray_cluster(nodes=2, cpus_per_node=1, extra_env=extra) as c:
        yield c.dashboard_url, c.env


def test_ray_job_submit_two_nodes_zero2(cluster: tuple[str, dict], s3: S3, tmp_path: Path, capsys, monkeypatch) -> None:
    address, env = cluster
    local = tmp_path / "data"
    write_shard_set(local / "train", [16] * 4, classes=CLASSES, seed=1)
    write_shard_set(local / "val", [8] * 2, classes=CLASSES, seed=2)
    manifest = read_manifest(str(local / "train"), columns=["key", "label"]).to_pydict()
    save_overrides(make_noise(manifest["key"], manifest["label"], len(CLASSES), 0.3, seed=0), str(local / "noise.parquet"))
    run_name = f"cluster-{uuid.uuid4().hex[:8]}"
    s3.fs.put(str(local), f"{s3.bucket}/{run_name}-data", recursive=True)
    data, out_dir = f"s3://{s3.bucket}/{run_name}-data", f"s3://{s3.bucket}/runs"
    cmd = [
        RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env", "cluster/runtime-env.yaml",
        "--submission-id", run_name, "--",
        sys.executable, "-m", "scn_scale.train", "--config", "cluster/configs/cpu-small.yaml", *set_flags([
            f"train_shards={data}/train", f"val_shards={data}/val", f"label_overrides={data}/noise.parquet",
            f"out_dir={out_dir}", f"run_name={run_name}", "num_workers=2", "deepspeed=cluster/deepspeed/zero2-cpu.json",
            "image_size=32", "batch_size=8", "epochs=2", "scn.relabel_epoch=1",
            "fail_at=epoch=2,step=2,rank=0",  # rank 0 raises in epoch 2: the run goes on from the bucket's checkpoint
        ]),
    ]
    job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and f"Job '{run_name}' succeeded" in output, output[-5000:]

    lines = checkpoint.read_metrics(f"{out_dir}/{run_name}")
    assert [m["epoch"] for m in lines] == [1, 2]
    assert "resumed_from" not in lines[0]
    assert lines[1]["resumed_from"] == {"epoch": 1, "table_digest": lines[0]["table_digest"]}
    for line in lines:  # the relabel table was identical on both ranks after every epoch
        assert len(line["table_digests"]) == 2 and len(set(line["table_digests"])) == 1
    assert lines[-1]["relabels_total"] > 0

    final = tmp_path / "final"  # the last checkpoint, fetched from the bucket
    s3.fs.get(f"{s3.bucket}/runs/{run_name}/{checkpoint.checkpoint_dir_name(2)}", str(final), recursive=True)
    table = RelabelTable.load(str(final / checkpoint.TABLE_FILE))
    assert table.digest() == lines[-1]["table_digest"]
    assert sorted(p.name for p in (final / checkpoint.DEEPSPEED_DIR / checkpoint.deepspeed_tag(2)).iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    _, classes, extra = load_model_file(str(final / checkpoint.MODEL_FILE))
    assert classes == list(CLASSES) and extra["epoch"] == 2

    # What comes next, straight from the bucket: evaluate the run (its latest checkpoint),
    # fine-tune from its model file; restarting it under another data order is refused.
    run = f"{out_dir}/{run_name}"
    last = f"{run}/{checkpoint.checkpoint_dir_name(2)}"
    assert checkpoint.latest_checkpoint(run) == last
    report = evaluate(EvalConfig(checkpoint=run, shards=f"{data}/val", out=str(tmp_path / "eval"), loader_workers=0))
    assert report["checkpoint"] == f"{last}/{checkpoint.MODEL_FILE}" and report["samples"] == 16
    assert report["run"]["dir"] == run and report["run"]["last"]["epoch"] == 2
    assert report["run"]["selected_on_evaluated_set"]  # its config.yaml, read from the bucket, names that set
    assert report["relabel"]["changed"] == lines[-1]["relabels_total"]
    loaded = load_weights(build_model(ModelConfig(), len(CLASSES)), f"{last}/{checkpoint.MODEL_FILE}", CLASSES)
    assert not loaded.missing and not loaded.mismatched
    monkeypatch.chdir(REPO)  # the job's relative config paths
    assert train_main([*cmd[cmd.index("--config"):], "--set", "seed=1"]) == 2
    assert "trained with seed=0; this start asks for seed=1" in capsys.readouterr().err
