"""Real multi-node Ray clusters on loopback for the tests, started and stopped by pid.

Ray replaces a node IP of 127.0.0.1 (or localhost) with the machine's network address,
so a head started with `--node-ip-address=127.0.0.1` still talks over that address.
Other loopback addresses are kept as given: each node gets its own (127.0.0.2,
127.0.0.3, ...), all of them on this machine. Stopped by process group, never with
`ray stop`, which would also end Ray processes the test did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

WAIT_FOR_NODES = (
    "import ray, sys, time\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "t = time.time()\n"
    "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
    "    assert time.time() - t < 60, ray.nodes()\n"
    "    time.sleep(0.5)\n"
)


@dataclass
class RayCluster:
    address: str  # GCS address, for RAY_ADDRESS / --ray-address
    dashboard_url: str  # for `ray job submit --address`
    env: dict[str, str]  # the environment every client of this cluster needs
    nodes: list[subprocess.Popen]  # each node's `ray start --block`, the head first: a process group each


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the node's whole process group (raylet, GCS, workers), then SIGKILL what is left.

    10 s: a test cluster has nothing to drain, and a node that outlived its head can wait far longer.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start_node(i: int, address: str | None, cpus: int, temp: str, env: dict[str, str]) -> tuple[subprocess.Popen, str, int]:
    """Start node i (0: the head) and wait until the cluster counts it; (process, GCS address, dashboard port).

    Ports are found free and then handed to Ray, which binds them a moment later; another process
    can take one in between (Ray's own workers pick ports at random), and the node's agent then
    fails to start. So a node that is not counted within a minute is stopped and started again
    on fresh ports, up to three times.
    """
    ip = f"127.0.0.{2 + i}"
    for attempt in range(3):
        agent = free_ports(4)
        common = [f"--node-ip-address={ip}", f"--num-cpus={cpus}", "--num-gpus=0",
                  f"--dashboard-agent-listen-port={agent[0]}", f"--dashboard-agent-grpc-port={agent[1]}",
                  f"--metrics-export-port={agent[2]}", f"--runtime-env-agent-port={agent[3]}", "--block"]
        dash = 0
        if i == 0:
            gcs, dash, client = free_ports(3)
            address = f"{ip}:{gcs}"
            args = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--ray-client-server-port={client}", f"--temp-dir={temp}", "--disable-usage-stats"]
        else:
            args = [f"--address={address}"]
        proc = subprocess.Popen([ray_bin(), "start", *args, *common], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, str(address), str(i + 1)], env=env, check=True,
                           timeout=90)
            return proc, str(address), dash
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _stop(proc)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1, extra_env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    # Nothing to drain on a test cluster: without the drain timeout a node takes up to 30 s to obey SIGTERM.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(extra_env or {})}
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    procs: list[subprocess.Popen] = []
    try:
        proc, address, dash = _start_node(0, None, cpus_per_node, temp, env)
        procs.append(proc)
        for i in range(1, nodes):
            procs.append(_start_node(i, address, cpus_per_node, temp, env)[0])
        yield RayCluster(address=address, dashboard_url=f"http://127.0.0.1:{dash}", env=env, nodes=procs)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
