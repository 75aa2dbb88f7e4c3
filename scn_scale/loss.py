"""The methods' losses: SCN's logit-weighted cross-entropy and rank regularization on alpha, plain
cross-entropy (the baseline), and Erasing Attention Consistency's flip-consistency loss (`eac_loss`).

The grouping rule is shared with the relabel rule (scope "low") through `high_group_mask`,
so the loss and the relabeling always agree on which samples are "high importance".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from scn_scale.config import SCNConfig
from scn_scale.model import SCNOutput


class LossParts(NamedTuple):
    total: Tensor
    wce: Tensor
    rr: Tensor


def weighted_ce(scaled_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean CE of alpha-scaled logits: alpha acts as an inverse temperature, not as a loss weight."""
    return F.cross_entropy(scaled_logits.float(), targets.long())


def baseline_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Plain CE on unscaled logits, for `method: baseline` (no weighting, no rank loss)."""
    return F.cross_entropy(logits.float(), targets.long())


def high_group_size(n: int, beta: float) -> int:
    """M, the size of the high-importance group among n ranked samples.

    M = int(beta * n), truncated as in the released code, then clamped to [1, n - 1] so
    that both groups are non-empty whenever n >= 2 (the released code takes the mean of
    an empty group, a NaN, when int(beta * n) is 0 or n). For n < 2 there is no pair to
    rank: M = 0, every sample is in the low group and the rank loss is 0.
    """
    if n < 2:
        return 0
    return min(max(int(beta * n), 1), n - 1)


def _descending_order(alpha: Tensor) -> Tensor:
    """Indices of alpha from high to low; ties keep their batch order, so grouping is deterministic."""
    return torch.sort(alpha.detach(), descending=True, stable=True).indices


def high_group_mask(alpha: Tensor, beta: float) -> Tensor:
    """Boolean [N] mask of the high-importance group: the first M of the stable descending order."""
    mask = torch.zeros(alpha.shape[0], dtype=torch.bool, device=alpha.device)
    mask[_descending_order(alpha)[: high_group_size(alpha.shape[0], beta)]] = True
    return mask


def rank_regularization(alpha: Tensor, beta: float, delta1: float) -> Tensor:
    """max(0, delta1 - (mean alpha of the high group - mean alpha of the low group)).

    Zero (still attached to the graph) for a batch of one; see `high_group_size`.
    """
    if alpha.dim() != 1 or alpha.shape[0] == 0:
        raise ValueError(f"alpha must be a non-empty 1-D tensor, got shape {tuple(alpha.shape)}")
    alpha = alpha.float()
    m = high_group_size(alpha.shape[0], beta)
    if m == 0:
        return alpha.sum() * 0.0
    ranked = alpha[_descending_order(alpha)]
    return torch.relu(delta1 - (ranked[:m].mean() - ranked[m:].mean()))


def scn_loss(out: SCNOutput, targets: Tensor, cfg: SCNConfig, ranked_alpha: Tensor | None = None) -> LossParts:
    """total = 2 * (gamma * RR + (1 - gamma) * WCE); gamma = 0.5 is the released code's WCE + RR.

    `ranked_alpha` is the alpha over which RR ranks when that is not the local batch: the
    batch gathered from every rank, detached except for this rank's own slice (which
    must be `out.alpha` itself). Gradient averaging across ranks (DDP, DeepSpeed) then
    divides RR's gradient by the world size, because each rank back-propagates only into
    its own slice; so RR's gradient (not its value) is multiplied by
    len(ranked_alpha) / len(alpha), the world size for equal per-rank batches, and the
    averaged update equals that of one process ranking the whole batch.
    """
    wce = weighted_ce(out.scaled_logits, targets)
    if ranked_alpha is None:
        rr = rank_regularization(out.alpha, cfg.beta, cfg.delta1)
        rr_for_grad = rr
    else:
        if ranked_alpha.shape[0] < out.alpha.shape[0]:
            raise ValueError(f"ranked_alpha ({ranked_alpha.shape[0]}) must contain the local batch ({out.alpha.shape[0]})")
        rr = rank_regularization(ranked_alpha, cfg.beta, cfg.delta1)
        scale = ranked_alpha.shape[0] / out.alpha.shape[0]
        rr_for_grad = rr + (scale - 1.0) * (rr - rr.detach())  # value rr, gradient scale * d(rr)
    total = 2.0 * (cfg.gamma * rr_for_grad + (1.0 - cfg.gamma) * wce)
    return LossParts(total, wce, rr)


def attention_consistency(cam: Tensor, cam_of_mirror: Tensor) -> Tensor:
    """Mean squared difference between a view's class activation maps and the mirrored maps of its mirror image.

    0 exactly when the network attends to the mirrored places of the mirrored face. Mirroring a
    map is `flip` along its width: the released code's `grid_sample` on a negated x grid (bilinear,
    align_corners, border padding) samples exactly the mirrored positions, so it computes the same
    numbers, up to float rounding.
    """
    if cam.shape != cam_of_mirror.shape or cam.dim() != 4:
        shapes = f"{tuple(cam.shape)} and {tuple(cam_of_mirror.shape)}"
        raise ValueError(f"two [N, C, h, w] maps of one shape expected, got {shapes}")
    return F.mse_loss(cam.float(), cam_of_mirror.float().flip(-1))


def eac_loss(out: SCNOutput, mirror: SCNOutput, targets: Tensor, lam: float) -> LossParts:
    """Erasing Attention Consistency (Zhang et al., ECCV 2022): CE(view) + lam * attention_consistency.

    `out` is the network on the augmented batch (random erasing included), `mirror` on its horizontal
    flip, both with their maps (`forward(x, cam=True)`). Only the first view has a cross-entropy
    term: the paper's "imbalanced framework", as in the released code. Returned as
    (total, cross-entropy, 0), the parts every method reports, so `loss` - `wce` in metrics.jsonl
    is lam times the consistency term.

    Where this differs from the released code (zyh-uaiaaaa/Erasing-Attention-Consistency, src/):
    - The mirror view: there (noisy-label runs) it is the raw image mirrored and then erased on its
      own, a different patch than the first view's and without its Gaussian noise; here it is the
      first view itself mirrored on the device, its erased patch mirrored too ("erase, then flip"),
      as the released code does when it trains on clean labels. One decoded view per sample keeps
      the loader the same for every method.
    - The network and recipe are this project's, shared with SCN and the baseline (ResNet-18 by
      default; there a VGGFace2 ResNet-50, Adam 1e-4, 60 epochs, batch 32), so that the methods
      differ by their loss only. The maps are 7x7 only at 224 px: 2x2 at the noise bench's 48 px
      and 1x1 at 32 px, where the term no longer concerns where the network looks, only that each
      class score (without its bias) is the same for a face and its mirror image.
    """
    if out.cam is None or mirror.cam is None:
        raise ValueError("eac_loss needs both views' class activation maps: call the model with cam=True")
    ce = baseline_loss(out.logits, targets)
    total = ce + lam * attention_consistency(out.cam, mirror.cam)
    return LossParts(total, ce.detach(), ce.new_zeros(()))
