"""The training step never waits for the device outside the logging interval.

On a GPU a host synchronisation (`.item()`, `.tolist()`, `float(t)`, a boolean mask, ...)
stalls the device's queue; on the CPU it costs nothing, so it cannot be timed here. It is
counted instead: a torch function mode sees every tensor operation of one real epoch of
`Worker.train_epoch` (real shards, real DeepSpeed engine, relabeling on) and records each
synchronising call made by scn_scale's own code, with the step during which it happened.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode

from scn_scale import loop, tracking
from scn_scale.config import SCNConfig, TrainConfig
from tests.conftest import write_shard_set

CLASSES = ("neutral", "happiness", "sadness", "surprise")
PACKAGE = str(Path(loop.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
#: Tensor operations that make the host wait for the device (their result is on the host, or its size depends on values).
SYNCING = {
    "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero", "argwhere",
    "unique", "unique_consecutive", "masked_select", "equal", "allclose",
}
INTERVAL = 3


def _boolean_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> str:
    """The file of the nearest frame outside torch (torch's Python wrappers are skipped)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    return "" if frame is None else frame.f_code.co_filename


class CountingLoader:
    """The epoch's loader, counting the batches it has handed to the step loop. Its tensors are
    host memory on any machine (the loader's output, before the loop moves what it needs to the
    device): reading them never waits for the device, so they are remembered and not counted."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.dataset, self.yielded = loader, loader.dataset, 0
        self.host: set[int] = set()

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.yielded += 1
            self.host = {id(t) for t in batch.values() if isinstance(t, torch.Tensor)}
            yield batch


class HostSyncs(TorchFunctionMode):
    """Records (step, operation, file) for every synchronising call made from scn_scale on a tensor
    that is not the loader's host output."""

    def __init__(self, loaders: list[CountingLoader]) -> None:
        super().__init__()
        self.loaders = loaders
        self.calls: list[tuple[int, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name in ("__getitem__", "__setitem__", "index_put_") and _boolean_index(args)):
            caller = _caller()
            loader = self.loaders[-1] if self.loaders else None
            on_host = loader is not None and bool(args) and id(args[0]) in loader.host
            if caller.startswith(PACKAGE) and not on_host:
                self.calls.append((loader.yielded if loader else 0, name, Path(caller).name))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def worker(one_rank, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> loop.Worker:
    write_shard_set(tmp_path / "train", [8] * 4, classes=CLASSES)
    write_shard_set(tmp_path / "val", [4], classes=CLASSES, seed=1)
    cfg = TrainConfig(
        train_shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"), out_dir=str(tmp_path / "out"),
        run_name="steps", batch_size=4, image_size=32, loader_workers=0, num_workers=1, log_every_steps=INTERVAL,
        scn=SCNConfig(relabel_epoch=1, delta2=0.0), deepspeed={"zero_optimization": {"stage": 2}},
    )
    spec = loop.WorkerSpec(cfg=cfg, deepspeed=loop.deepspeed_config(cfg), classes=CLASSES, storage=str(tmp_path / "out"),
                           progress=True)  # rank 0's log line per interval
    monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: None)  # no Ray session: a fresh run
    return loop.Worker(spec, torch.device("cpu"))


def test_a_step_synchronises_only_at_the_logging_interval(worker: loop.Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    loaders: list[CountingLoader] = []
    make_loader = loop.Worker._loader

    def counting(self, *args, **kwargs) -> CountingLoader:
        loaders.append(CountingLoader(make_loader(self, *args, **kwargs)))
        return loaders[-1]

    monkeypatch.setattr(loop.Worker, "_loader", counting)
    tracker = tracking.open_tracker(worker.cfg, worker.spec.run_dir, [], first_epoch=1)  # TensorBoard, as by default
    with HostSyncs(loaders) as syncs:
        stats, samples = worker.train_epoch(1, tracker)
    tracker.close()
    # Per-step scalars from those reads: every interval, and the epoch's last steps from the end's read.
    assert tracking.read_scalars(worker.spec.run_dir)["step/loss"][0] == [INTERVAL, 2 * INTERVAL, 8]

    steps = stats.steps
    assert steps == 8 and stats.samples == 32  # 32 samples, batches of 4
    per_step = Counter(step for step, _, _ in syncs.calls)
    # One read of the running sums per interval; the last step also carries the epoch end's read.
    expected = {k: int(k % INTERVAL == 0) + int(k == steps) for k in range(1, steps + 1)}
    assert {k: per_step[k] for k in range(1, steps + 1)} == expected, syncs.calls
    assert {(name, file) for _, name, file in syncs.calls} == {("tolist", "metrics.py")}

    # What stayed on the device came back whole at the end.
    assert 0 < stats.loss and 0 <= stats.correct <= stats.samples
    rows, alpha = samples.last_visits()
    assert len(rows) == 32 and ((0 < alpha) & (alpha < 1)).all()
    assert len(samples.proposals()) > 0  # delta2 = 0: most samples propose their argmax
