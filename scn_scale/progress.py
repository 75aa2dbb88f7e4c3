"""What rank 0 shows while an epoch trains: a progress bar on the driver's terminal, else one log line per interval.

A tqdm bar inside a Ray worker writes carriage returns into the worker's log, which Ray
forwards to the driver line by line, each prefixed with the worker's name: in job logs and
on a terminal alike the bar comes out as a stream of broken lines. Ray's own tqdm
(`ray.experimental.tqdm_ray`) sends the bar's state to the driver instead, which draws it
below the other output; it is the choice when the driver's stderr is a terminal. Anywhere
else (`ray job submit` logs, CI, a file) a bar has no screen to redraw, so rank 0 logs one
line per `log_every_steps` with the loss and alpha of the epoch so far.
"""

from __future__ import annotations

import logging
from typing import Literal

from ray.experimental import tqdm_ray

log = logging.getLogger(__name__)

Mode = Literal["bar", "lines", "none"]


def mode(show: bool, terminal: bool, rank: int) -> Mode:
    """What rank `rank` shows: nothing unless asked to (`show`) and rank 0; a bar when the driver is on a terminal."""
    if not show or rank != 0:
        return "none"
    return "bar" if terminal else "lines"


class EpochProgress:
    """One epoch's progress: `advance` every step, `report` at every read of the running sums."""

    def __init__(self, how: Mode, epoch: int, steps: int, done: int = 0) -> None:
        """`done`: steps trained before this start (an epoch resumed mid-way)."""
        self.how, self.epoch, self.steps = how, epoch, steps
        self.bar = tqdm_ray.tqdm(total=steps, desc=f"epoch {epoch}", unit="step") if how == "bar" else None
        if self.bar is not None and done:
            self.bar.update(done)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)  # tqdm_ray sends the state at most once a second

    def report(self, step: int, loss: float, alpha: float, images_per_s: float) -> None:
        """The running loss and alpha (means over the epoch's samples so far) after `step` steps."""
        if self.bar is not None:
            # tqdm_ray has no postfix: the numbers go in the description.
            self.bar.set_description(f"epoch {self.epoch} loss {loss:.4f} alpha {alpha:.3f}")
        elif self.how == "lines":
            log.info("epoch %d step %d/%d: loss %.4f, alpha %.3f, %.1f images/s",
                     self.epoch, step, self.steps, loss, alpha, images_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
