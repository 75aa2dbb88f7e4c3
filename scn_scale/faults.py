"""Fault injection by setting: `fail_at="epoch=E,step=S,rank=R"` makes rank R raise after step S of epoch E.

It exists so that tests (and anyone doubting the recovery path) can watch a worker die
mid-epoch and the run continue from its last checkpoint. Each fault fails one attempt only:
the failing rank leaves a marker file for it in the run directory before failing, and a
restarted attempt that finds it trains on. Epochs and steps are 1-based. Several faults are
separated by ";" (`"epoch=3,step=5,rank=1;epoch=4,step=2,rank=0"`), one attempt each.

A fault strikes after its step and after the checkpoint that follows the step, if any (a
mid-epoch one every `checkpoint_every_steps`, the epoch's own after its last step): the
worst moment, when the newest checkpoint is on storage and Ray Train may not have taken in
its report yet (its controller polls the workers every two seconds). The restarted attempt
finds it complete there (scn_scale.checkpoint.resume_point).

`how=kill` (`"epoch=E,step=S,rank=R,how=kill"`) makes the rank's process SIGKILL itself
instead: no exception, no clean-up, no last words to Ray, as when the kernel's OOM killer
or an operator ends it; Ray learns of it only from the dead process.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from scn_scale.config import ConfigError
from shards.fs import open_fs

log = logging.getLogger(__name__)

#: The run directory's folder of markers, one file per injected fault, named as its fault.
MARKER_NAME = "fault-injected"
FIELDS = ("epoch", "step", "rank")
HOWS = ("raise", "kill")


class InjectedFault(RuntimeError):
    """The failure asked for by `fail_at`; seeing it in a log means the setting worked."""


@dataclass(frozen=True)
class FaultPlan:
    """The faults `fail_at` asks for."""

    faults: tuple[Fault, ...]

    @classmethod
    def parse(cls, text: str, num_workers: int) -> FaultPlan | None:
        """None for ""; else every ";"-separated fault (`Fault.parse`)."""
        if not text.strip():
            return None
        return cls(tuple(Fault.parse(part, num_workers) for part in text.split(";")))

    def check(self, epoch: int, step: int, rank: int, run_dir: str) -> None:
        for fault in self.faults:
            fault.check(epoch, step, rank, run_dir)


@dataclass(frozen=True)
class Fault:
    epoch: int
    step: int
    rank: int
    how: str = "raise"

    @classmethod
    def parse(cls, text: str, num_workers: int) -> Fault:
        """ConfigError unless exactly epoch, step and rank are given, each >= 1 (rank >= 0, < num_workers),
        and `how`, if given, is one of HOWS."""
        values: dict[str, int] = {}
        how = None
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name == "how" and how is None:
                how = value.strip()
                if how not in HOWS:
                    raise ConfigError(f"fail_at: how must be one of {', '.join(HOWS)}, got {how!r}")
                continue
            if name not in FIELDS or name in values:
                raise ConfigError(f"fail_at: {name!r} is unknown or repeated; give each of {', '.join(FIELDS)} once "
                                  "(and how=raise or how=kill), e.g. 'epoch=2,step=3,rank=1'")
            try:
                values[name] = int(value)
            except ValueError:
                raise ConfigError(f"fail_at: {name} must be an integer, got {value!r}") from None
        if set(values) != set(FIELDS):
            raise ConfigError(f"fail_at needs {', '.join(FIELDS)}; got {text!r}")
        plan = cls(**values, how=how or "raise")
        if plan.epoch < 1 or plan.step < 1 or not 0 <= plan.rank < num_workers:
            raise ConfigError(f"fail_at {text!r}: epoch and step are 1-based and rank must be in [0, {num_workers})")
        return plan

    def check(self, epoch: int, step: int, rank: int, run_dir: str) -> None:
        """Fail at the planned point (raise InjectedFault, or SIGKILL this process), unless an earlier attempt did."""
        if (epoch, step, rank) != (self.epoch, self.step, self.rank):
            return
        fs, root = open_fs(run_dir)
        marker = f"{root}/{MARKER_NAME}/epoch={epoch},step={step},rank={rank}"
        if fs.exists(marker):
            return
        fs.makedirs(f"{root}/{MARKER_NAME}", exist_ok=True)
        with fs.open(marker, "w") as f:
            f.write(f"{self.how}\n")
        log.warning("injecting the failure asked for by fail_at (%s): epoch %d, step %d, rank %d", self.how, epoch, step, rank)
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected failure at epoch {epoch}, step {step}, rank {rank} (fail_at)")
