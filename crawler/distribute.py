"""Where work-shard tasks run: in this process, in a pool of local processes, or as Ray tasks.

    with open_runner(DistributeConfig(workers=4)) as runner:   # workers start (or Ray connects) here
        ...                                                     # discovery overlaps their start-up
        for result in runner.run(fn, tasks):                    # completion order
            ...

The task is a plain function of picklable arguments returning a picklable result, so the
three runners are interchangeable and a task's result never depends on the runner; the
caller orders results (see `crawler.pipeline`). At most `max_in_flight` tasks are
submitted at a time, so a million-candidate crawl does not hold every work shard's
arguments in memory (or in Ray's object store) at once.

Local processes are started with `spawn` (torch and threads make `fork` unsafe) as soon
as the runner opens, so their start-up overlaps the driver's discovery. A Ray cluster is
connected to when the runner opens (an unreachable address fails before any work); it
gets the `crawler` and `shards` packages shipped as `py_modules`, so its nodes need the
dependencies but not this checkout; each task asks for `cpus_per_task` CPUs and is
retried by Ray if its worker dies (`max_retries`).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'ray[default]'"


@dataclass(frozen=True)
class DistributeConfig:
    #: Local worker processes (0: run every task in this process, one after another).
    workers: int = 2
    #: A Ray cluster address ("auto", "127.0.0.1:6379", "ray://...", or "local" for a new in-process one).
    ray_address: str | None = None
    cpus_per_task: float = 1.0
    max_retries: int = 2
    #: Tasks submitted but not yet collected; 0 picks twice the parallelism.
    max_in_flight: int = 0
    #: Ship this checkout's packages to the Ray cluster (off when the nodes already have them installed).
    ship_code: bool = True

    def validate(self) -> "DistributeConfig":
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.cpus_per_task <= 0 or self.max_retries < 0 or self.max_in_flight < 0:
            raise ValueError("cpus_per_task must be positive, max_retries and max_in_flight >= 0")
        if self.ray_address is not None:
            try:
                import ray  # noqa: F401
            except ImportError as exc:
                raise ImportError(f"--ray-address needs Ray: {RAY_INSTALL} ({exc})") from exc
        return self


class Runner(Protocol):
    #: Tasks that may run at the same time (what a per-host budget is shared among).
    parallel: int

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple]) -> Iterator[Any]: ...

    def close(self) -> None: ...


def open_runner(config: DistributeConfig) -> "InProcess | LocalProcesses | RayTasks":
    config.validate()
    if config.ray_address is not None:
        return RayTasks(config)
    if config.workers == 0:
        return InProcess()
    return LocalProcesses(config)


class _Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class InProcess(_Context):
    parallel = 1

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple]) -> Iterator[Any]:
        return (fn(*args) for args in tasks)

    def close(self) -> None:
        pass


def _ready() -> bool:
    return True


class LocalProcesses(_Context):
    def __init__(self, config: DistributeConfig) -> None:
        self.limit = config.max_in_flight or 2 * config.workers
        self.parallel = min(config.workers, self.limit)
        self.pool = ProcessPoolExecutor(max_workers=config.workers, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(config.workers):  # start every worker now, not on the first task
            self.pool.submit(_ready)

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple]) -> Iterator[Any]:
        pending = iter(tasks)
        running: set[Future] = set()
        try:
            while True:
                while len(running) < self.limit:
                    args = next(pending, None)
                    if args is None:
                        break
                    running.add(self.pool.submit(fn, *args))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # a task that raised (or a dead worker) raises here
        finally:
            for future in running:
                future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayTasks(_Context):
    def __init__(self, config: DistributeConfig) -> None:
        import ray

        self.config = config
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": config.ray_address, "logging_level": logging.WARNING}
            if config.ray_address == "local":
                kwargs.update(num_cpus=max(1, config.workers), include_dashboard=False)
            if config.ship_code:
                import crawler
                import shards

                kwargs["runtime_env"] = {
                    "py_modules": [str(Path(crawler.__file__).parent), str(Path(shards.__file__).parent)]
                }
            ray.init(**kwargs)
            self._started = True

    @property
    def parallel(self) -> int:
        """Tasks the cluster's CPUs run at once (at most max_in_flight); read when asked, as clusters scale."""
        slots = max(1, int(self._ray.cluster_resources().get("CPU", 1) / self.config.cpus_per_task))
        return min(slots, self.config.max_in_flight) if self.config.max_in_flight else slots

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple]) -> Iterator[Any]:
        ray, cfg = self._ray, self.config
        remote = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=cfg.max_retries)(fn)
        limit = cfg.max_in_flight or 2 * self.parallel
        pending = iter(tasks)
        running: list = []
        try:
            while True:
                while len(running) < limit:
                    args = next(pending, None)
                    if args is None:
                        break
                    running.append(remote.remote(*args))
                if not running:
                    return
                done, running = ray.wait(running, num_returns=1)
                for ref in done:
                    yield ray.get(ref)  # a task that failed for good raises here
        finally:
            for ref in running:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
