"""SCN's relabel rule: propose argmax_k p_k when it beats the given label's probability by more than delta2.

Epochs are 1-based throughout the project (epoch 1 is the first), as in the released
code, so `relabel_epoch = 10` means the tenth epoch. Proposals are plain values; the
relabel table (scn_scale.relabel_table) decides what they change.

Three forms of the same thing: `BatchProposals`, one training batch's proposals as device
tensors (making them costs no host synchronisation); `ProposalRows`, one epoch's proposals
keyed by dense sample row, the form ranks exchange and the table merges; and `Proposal`,
one plain value, for callers that hold a handful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from scn_scale.config import SCNConfig
from scn_scale.loss import high_group_mask
from scn_scale.model import SCNOutput


@dataclass(frozen=True)
class Proposal:
    key: str
    old_label: int
    new_label: int
    margin: float  # p_max - p_old_label, > delta2
    epoch: int  # 1-based


@dataclass(frozen=True)
class BatchProposals:
    """One batch's proposals on the batch's device: sample i proposes `new_label[i]` where `fire[i]`.

    Kept as tensors so that the training step never waits for the device; the trainer
    copies an epoch's worth back once, at the epoch end. `to_list` is the host form.
    """

    keys: Sequence[str]
    epoch: int
    fire: Tensor  # bool [B]
    old_label: Tensor  # long [B]
    new_label: Tensor  # long [B]
    margin: Tensor  # float64 [B]

    def to_list(self) -> list[Proposal]:
        """The fired proposals as values (a host synchronisation)."""
        fired = torch.nonzero(self.fire).flatten().tolist()
        old, new, margin = self.old_label.tolist(), self.new_label.tolist(), self.margin.tolist()
        return [Proposal(self.keys[i], old[i], new[i], margin[i], self.epoch) for i in fired]


@dataclass(frozen=True)
class ProposalRows:
    """One epoch's proposals keyed by dense sample row (scn_scale.relabel_table.SampleIndex), on the CPU."""

    epoch: int
    rows: Tensor  # int64 [P]
    old_label: Tensor  # int64 [P]
    new_label: Tensor  # int64 [P]
    margin: Tensor  # float64 [P]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @classmethod
    def of(cls, epoch: int, rows: Sequence[int] | np.ndarray | Tensor, old_label, new_label, margin) -> ProposalRows:
        """From any array-likes, in the dtypes above."""
        return cls(
            epoch,
            torch.as_tensor(rows, dtype=torch.int64),
            torch.as_tensor(old_label, dtype=torch.int64),
            torch.as_tensor(new_label, dtype=torch.int64),
            torch.as_tensor(margin, dtype=torch.float64),
        )

    def select(self, mask: Tensor) -> ProposalRows:
        return ProposalRows(self.epoch, self.rows[mask], self.old_label[mask], self.new_label[mask], self.margin[mask])

    def reduced(self) -> ProposalRows:
        """One proposal per row, the best by `reduce_proposals`' order (within one epoch: larger
        margin, then smaller new label, then smaller old label), whatever the input order."""
        if len(self) == 0:
            return self
        # The best of each row sorts last among its row's proposals.
        order = np.lexsort((-self.old_label.numpy(), -self.new_label.numpy(), self.margin.numpy(), self.rows.numpy()))
        rows = self.rows.numpy()[order]
        last = np.append(rows[1:] != rows[:-1], True)
        return self.select(torch.from_numpy(order[last]))


def propose_relabels(
    keys: Sequence[str],
    labels: Tensor,
    out: SCNOutput,
    epoch: int,
    cfg: SCNConfig,
    ranked_alpha: Tensor | None = None,
    local_offset: int | None = None,
) -> BatchProposals | None:
    """Proposals for one training batch, from the forward pass that produced `out`; None before `cfg.relabel_epoch`.

    Fires from the 1-based `cfg.relabel_epoch` on, when max_k p_k - p_label > delta2
    strictly, with p = softmax(alpha * W x). Under scope "low" only samples outside the
    high-importance group may be relabeled, grouped by the same rule as the rank loss:
    over `ranked_alpha` when given (the gathered global batch), in which case
    `local_offset` must say where this batch's alpha starts inside it.
    """
    n = len(keys)
    if labels.shape != (n,) or out.scaled_logits.shape[0] != n:
        raise ValueError(f"{n} keys, labels of shape {tuple(labels.shape)}, logits of shape {tuple(out.scaled_logits.shape)}")
    if epoch < cfg.relabel_epoch:
        return None
    # float64, so that the comparison with delta2 (a Python float) is made at its precision.
    probs = torch.softmax(out.scaled_logits.detach().double(), dim=1)
    p_max, new_labels = probs.max(dim=1)  # ties: the first maximal class
    labels = labels.to(probs.device, torch.long)
    margins = p_max - probs.gather(1, labels[:, None]).squeeze(1)
    fire = margins > cfg.delta2
    if cfg.relabel_scope == "low":
        fire &= ~_local_high_group(out.alpha, cfg.beta, ranked_alpha, local_offset)
    return BatchProposals(keys, epoch, fire, labels, new_labels, margins)


def _local_high_group(alpha: Tensor, beta: float, ranked_alpha: Tensor | None, local_offset: int | None) -> Tensor:
    if ranked_alpha is None:
        return high_group_mask(alpha, beta)
    if local_offset is None:
        raise ValueError("relabel scope 'low' with a gathered ranked_alpha needs local_offset: the position of this rank's batch in it")
    n = alpha.shape[0]
    if not 0 <= local_offset <= ranked_alpha.shape[0] - n:
        raise ValueError(f"local_offset {local_offset} does not place a batch of {n} inside ranked_alpha of {ranked_alpha.shape[0]}")
    return high_group_mask(ranked_alpha, beta)[local_offset : local_offset + n].to(alpha.device)


def _rank(p: Proposal) -> tuple:
    """Total order on proposals of one key: later epoch, then larger margin, then smaller labels win."""
    return (p.epoch, p.margin, -p.new_label, -p.old_label)


def reduce_proposals(proposals: Iterable[Proposal]) -> dict[str, Proposal]:
    """One proposal per key (rollover and resampling revisit samples), the same whatever the input order."""
    best: dict[str, Proposal] = {}
    for p in proposals:
        if p.key not in best or _rank(p) > _rank(best[p.key]):
            best[p.key] = p
    return best
