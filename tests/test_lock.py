"""One writer per output directory: a second shard writer, crawl, import or training start is refused
naming the holder's pid and host, changes nothing, and a lock left by a SIGKILLed writer is taken over.

The first writer is a real process (a ShardWriter halfway through a set: one finished shard and an
open temporary tar), so the refusal names another pid than the test's, and the kill is a real SIGKILL.
On object storage (a loopback S3 API) the lock is an object with a heartbeat; its takeover rules are
tested with planted records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from crawler import build
from scn_scale.importers.__main__ import main as import_main
from scn_scale.train import main as train_main
from shards import OutputLock, OutputLocked, Sample, ShardWriter, read_manifest
from shards.cli import set_flags
from shards.lock import LOCK_NAME
from tests.conftest import S3, jpeg_bytes, write_shard_set

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["neutral", "happiness"]
HOST = socket.gethostname()

#: A writer halfway through: shard-000000 finished, a third sample in the open temporary tar.
HALF_WRITTEN = (
    "import io, sys, time\n"
    "from PIL import Image\n"
    "from shards import Sample, ShardWriter, key_from_bytes\n"
    "writer = ShardWriter(sys.argv[1], ['neutral', 'happiness'], max_samples=2)\n"
    "for i in range(3):\n"
    "    buf = io.BytesIO()\n"
    "    Image.new('RGB', (40, 40), (60 * i, 90, 30)).save(buf, 'PNG')\n"
    "    writer.write(Sample(key=key_from_bytes(buf.getvalue()), image=buf.getvalue(), label=i % 2, ext='png'))\n"
    "print('READY', flush=True)\n"
    "time.sleep(600)\n"
)


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under `root` (hidden temporary files included): a file's sha256, None for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def half_written(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A set being written by another process, which holds its lock; killed at the end if still alive."""
    out = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def _holder(proc: subprocess.Popen) -> str:
    return f"pid {proc.pid} on host {HOST}"


def read_manifest_rows(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def test_a_second_shard_writer_is_refused_and_changes_nothing(half_written) -> None:
    out, proc = half_written
    before = snapshot(out)
    assert any(name.endswith(".tmp") for name in before)  # the first writer's open shard
    with pytest.raises(OutputLocked, match=f"{out} is being written by {_holder(proc)}"):
        ShardWriter(out, CLASSES)
    assert snapshot(out) == before


def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, CLASSES, max_samples=2) as first:
        data = jpeg_bytes(rng)
        first.write(Sample(key="a", image=data, label=0))
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on host {HOST}"):
            ShardWriter(tmp_path, CLASSES)
    with ShardWriter(tmp_path, CLASSES) as again:  # released on close
        again.write(Sample(key="b", image=jpeg_bytes(rng), label=1))
    assert sorted(read_manifest(str(tmp_path)).column("key").to_pylist()) == ["a", "b"]


def test_a_crawl_into_a_set_being_written_is_refused(half_written, tmp_path: Path, capsys) -> None:
    out, proc = half_written
    urls = tmp_path / "urls.csv"
    urls.write_text("url,label\nhttp://127.0.0.1:9/a.jpg,happiness\n")
    before = snapshot(out)
    code = build.main(["--provider", "urllist", "--input", str(urls), "--faces", "none", "--out", str(out),
                       "--resume", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {out} is being written by {_holder(proc)}"), err
    assert snapshot(out) == before


def test_an_import_into_a_set_being_written_is_refused(half_written, tmp_path: Path, capsys) -> None:
    out, proc = half_written
    for name in ("happiness/a.png", "neutral/b.png"):
        (tmp_path / "faces" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / name).write_bytes(jpeg_bytes(np.random.default_rng(1)))
    before = snapshot(out)
    assert import_main(["imagefolder", "--root", str(tmp_path / "faces"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out} is being written by {_holder(proc)}")
    assert snapshot(out) == before


def test_a_second_start_of_a_training_run_is_refused(tmp_path: Path, capsys) -> None:
    write_shard_set(tmp_path / "set", [4] * 4, classes=tuple(CLASSES + ["sadness", "surprise"]))
    run = tmp_path / "runs" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom shards.lock import OutputLock\nOutputLock(sys.argv[1]).acquire()\n"
         "print('READY', flush=True)\ntime.sleep(600)\n", str(run)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "READY"
        before = snapshot(tmp_path / "runs")
        code = train_main(["--config", str(REPO / "cluster/configs/cpu-small.yaml"), *set_flags([
            f"train_shards={tmp_path / 'set'}", f"val_shards={tmp_path / 'set'}", f"out_dir={tmp_path / 'runs'}",
            "run_name=r"])])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {run} is being written by {_holder(holder)}"), err
        assert snapshot(tmp_path / "runs") == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_sigkilled_writer_is_taken_over(half_written, caplog) -> None:
    out, proc = half_written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = read_manifest_rows(out / "shard-000000.parquet")
    with caplog.at_level(logging.WARNING, logger="shards.lock"):
        with ShardWriter(out, CLASSES, max_samples=2) as writer:
            writer.write(Sample(key="after", image=jpeg_bytes(np.random.default_rng(2)), label=1))
    assert f"took over the lock left by {_holder(proc)}" in caplog.text
    # The dead writer's finished shard stays as it was; its unfinished one is gone; numbering goes on.
    assert read_manifest_rows(out / "shard-000000.parquet") == finished
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert read_manifest(str(out)).column("key").to_pylist() == [*finished, "after"]
    assert (out / LOCK_NAME).read_text() == ""  # released


# -- object storage -------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(s3: S3, run: str, **record) -> None:
    s3.fs.pipe_file(f"{run.removeprefix('s3://')}/{LOCK_NAME}", json.dumps(record).encode())


def test_object_store_lock_refuses_a_live_holder_and_takes_over_a_dead_or_silent_one(s3: S3) -> None:
    run = f"s3://{s3.bucket}/lock-{os.getpid()}/run"
    with OutputLock(run, heartbeat_s=0.2) as first:
        time.sleep(0.5)  # a few heartbeats
        with pytest.raises(OutputLocked, match=f"{run} is being written by pid {os.getpid()} on host {HOST}"):
            OutputLock(run).acquire()
        assert first.held
    assert not s3.fs.exists(f"{run.removeprefix('s3://')}/{LOCK_NAME}")  # released: removed

    now = time.time()
    _plant(s3, run, pid=4242, host="elsewhere", since=now - 60, heartbeat=now - 1, token="t")
    with pytest.raises(OutputLocked, match="pid 4242 on host elsewhere"):  # alive by its heartbeat
        OutputLock(run, stale_s=30).acquire()
    _plant(s3, run, pid=4242, host="elsewhere", since=now - 600, heartbeat=now - 120, token="t")
    with OutputLock(run, stale_s=30):  # silent for longer than stale_s
        pass
    _plant(s3, run, pid=_dead_pid(), host=HOST, since=now, heartbeat=now, token="t")
    with OutputLock(run):  # a dead pid on this host, heartbeat fresh
        pass
