"""Fault injection by setting: `fail_at="epoch=E,step=S,rank=R"` makes rank R raise at step S of epoch E.

It exists so that tests (and anyone doubting the recovery path) can watch a worker die
mid-epoch and the run continue from its last checkpoint. Only the first attempt fails:
the failing rank leaves a marker file in the run directory before raising, and a
restarted attempt that finds it trains on. Epochs and steps are 1-based.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scn_scale.config import ConfigError
from shards.fs import open_fs

log = logging.getLogger(__name__)

MARKER_NAME = "fault-injected"
FIELDS = ("epoch", "step", "rank")


class InjectedFault(RuntimeError):
    """The failure asked for by `fail_at`; seeing it in a log means the setting worked."""


@dataclass(frozen=True)
class FaultPlan:
    epoch: int
    step: int
    rank: int

    @classmethod
    def parse(cls, text: str, num_workers: int) -> FaultPlan | None:
        """None for ""; ConfigError unless exactly epoch, step and rank are given, each >= 1 (rank >= 0, < num_workers)."""
        if not text.strip():
            return None
        values: dict[str, int] = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in FIELDS or name in values:
                raise ConfigError(f"fail_at: {name!r} is unknown or repeated; give each of {', '.join(FIELDS)} once, e.g. 'epoch=2,step=3,rank=1'")
            try:
                values[name] = int(value)
            except ValueError:
                raise ConfigError(f"fail_at: {name} must be an integer, got {value!r}") from None
        if set(values) != set(FIELDS):
            raise ConfigError(f"fail_at needs {', '.join(FIELDS)}; got {text!r}")
        plan = cls(**values)
        if plan.epoch < 1 or plan.step < 1 or not 0 <= plan.rank < num_workers:
            raise ConfigError(f"fail_at {text!r}: epoch and step are 1-based and rank must be in [0, {num_workers})")
        return plan

    def check(self, epoch: int, step: int, rank: int, run_dir: str) -> None:
        """Raise InjectedFault at the planned point, unless an earlier attempt already did."""
        if (epoch, step, rank) != (self.epoch, self.step, self.rank):
            return
        fs, root = open_fs(run_dir)
        marker = f"{root}/{MARKER_NAME}"
        if fs.exists(marker):
            return
        fs.makedirs(root, exist_ok=True)
        with fs.open(marker, "w") as f:
            f.write(f"epoch={epoch},step={step},rank={rank}\n")
        log.warning("injecting the failure asked for by fail_at: epoch %d, step %d, rank %d", epoch, step, rank)
        raise InjectedFault(f"injected failure at epoch {epoch}, step {step}, rank {rank} (fail_at)")
