"""Fixtures shared by the test modules: small real images and shard sets, and the servers several modules use."""

from __future__ import annotations

import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from shards import CANONICAL, Sample, ShardWriter, key_from_bytes

# Library code must find its CPU accelerator in every process the tests start.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs the quick tests on two pytest-xdist workers (`--dist loadgroup`); those on the
    session's in-process Ray cluster form one group, so that only one worker starts that cluster."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


def jpeg_bytes(rng: np.random.Generator, size: int = 32, label: int | None = None) -> bytes:
    """A small random JPEG; with `label`, its mean colour depends on the label (learnable)."""
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    if label is not None:
        tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.uint8)
        pixels = (pixels // 4 + tint // 4 * 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard_set(
    out: Path,
    shard_sizes: list[int],
    classes: tuple[str, ...] = CANONICAL,
    seed: int = 0,
    size: int = 32,
    split: str = "train",
) -> list[str]:
    """Write a set whose shards hold exactly `shard_sizes` samples; returns the keys in order."""
    rng = np.random.default_rng(seed)
    keys: list[str] = []
    for n in shard_sizes:
        with ShardWriter(out, classes, max_samples=n) as writer:
            for _ in range(n):
                label = int(rng.integers(len(classes)))
                data = jpeg_bytes(rng, size, label)
                sample = Sample(key=key_from_bytes(data), image=data, label=label, split=split,
                                meta={"provider": "test", "source_id": str(len(keys))})
                writer.write(sample)
                keys.append(sample.key)
    return keys


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def _one_rank_group():
    """One single-process gloo group for the whole session: DeepSpeed keeps the first group
    it sees, so a group torn down and made again by a later module would leave it holding a
    dead one."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield env
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray cluster for the session, on a loopback address Ray keeps (127.0.0.2).

    Ray started and stopped several times in one process is fragile (in CI a later session's
    first actor was destroyed before it ran), so every module that needs Ray in this process
    shares this one. 4 logical CPUs: two 2-worker training runs fit side by side. The raylet
    passes its environment to the workers, so gloo stays on loopback in every one of them.
    """
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("GLOO_SOCKET_IFNAME", "lo")
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner queries every
        # second; without it each query logs "Failed to query Ray Train Controller actor state".
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.2")
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@dataclass
class S3:
    fs: Any  # an s3fs filesystem on the server
    bucket: str
    env: dict[str, str]  # the variables that point every S3 client (s3fs, pyarrow) at the server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """A real S3 API (moto's server) on 127.0.0.1 with one empty bucket, for the session.

    Clients find it through the standard AWS_ENDPOINT_URL variable, set here for this process
    and its children (loader workers) and passed on to Ray clusters by the tests that start them.
    """
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an earlier endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir("scn-test")
        try:
            yield S3(fs, "scn-test", env)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def one_rank(_one_rank_group):
    """A one-process group, set up the way DeepSpeed expects outside Ray (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    The rank variables are set for the using module only: left in the environment they would
    reach the tests that start real multi-process groups and Ray clusters.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _one_rank_group.items():
            patch.setenv(name, value)
        yield
