import math

import pytest
import torch

from scn_scale.config import SCNConfig
from scn_scale.loss import (
    attention_consistency, baseline_loss, eac_loss, high_group_mask, high_group_size, rank_regularization, scn_loss, weighted_ce,
)
from scn_scale.model import SCNOutput


def output(logits, alpha):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    return SCNOutput(logits, alpha, alpha[:, None] * logits)


def test_weighted_ce_scales_logits_not_the_loss():
    out = output([[2.0, 0.0], [0.0, 0.0]], [0.5, 0.25])  # scaled: [1, 0], [0, 0]
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert weighted_ce(out.scaled_logits, torch.tensor([0, 1])).item() == pytest.approx(expected, abs=1e-6)
    # The unscaled CE differs: alpha is an inverse temperature.
    assert baseline_loss(out.logits, torch.tensor([0, 1])).item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, abs=1e-6)


@pytest.mark.parametrize(
    "n, beta, m",
    [(1, 0.7, 0), (2, 0.7, 1), (3, 0.7, 2), (10, 0.7, 7), (64, 0.7, 44), (3, 0.3, 1), (2, 0.1, 1), (4, 1.0, 3), (5, 0.99, 4)],
)
def test_high_group_size(n, beta, m):
    assert high_group_size(n, beta) == m


def test_rank_regularization_hand_computed():
    alpha = torch.tensor([0.9, 0.2, 0.6, 0.4])  # M = int(2.8) = 2: high {0.9, 0.6} mean 0.75, low {0.4, 0.2} mean 0.3
    assert rank_regularization(alpha, 0.7, 0.5).item() == pytest.approx(0.05, abs=1e-6)
    assert rank_regularization(alpha, 0.7, 0.07).item() == 0.0  # the gap 0.45 exceeds delta1


def test_batch_of_one_has_no_rank_loss():
    alpha = torch.tensor([0.3], requires_grad=True)
    rr = rank_regularization(alpha, 0.7, 0.15)
    assert rr.item() == 0.0
    rr.backward()
    assert alpha.grad.tolist() == [0.0]
    out = output([[1.0, 0.0]], [0.3])
    parts = scn_loss(out, torch.tensor([1]), SCNConfig(gamma=0.25))
    wce = math.log(1 + math.exp(0.3))  # CE of [0.3, 0] at class 1
    assert parts.rr.item() == 0.0
    assert parts.wce.item() == pytest.approx(wce, abs=1e-6)
    assert parts.total.item() == pytest.approx(2 * 0.75 * wce, abs=1e-6)


def test_batch_of_two():
    alpha = torch.tensor([0.3, 0.5], requires_grad=True)  # M = int(1.4) = 1: high 0.5, low 0.3
    rr = rank_regularization(alpha, 0.7, 0.5)
    assert rr.item() == pytest.approx(0.3, abs=1e-6)
    rr.backward()
    assert alpha.grad.tolist() == pytest.approx([1.0, -1.0])


def test_beta_rounding_to_zero_keeps_one_high_sample():
    # int(0.3 * 3) = 0 -> M = 1: high {0.8}, low {0.5, 0.2} mean 0.35
    assert rank_regularization(torch.tensor([0.2, 0.8, 0.5]), 0.3, 1.0).item() == pytest.approx(0.55, abs=1e-6)


def test_beta_rounding_to_n_keeps_one_low_sample():
    # int(1.0 * 4) = 4 -> M = 3: high {0.4, 0.3, 0.2} mean 0.3, low {0.1}
    assert rank_regularization(torch.tensor([0.1, 0.2, 0.3, 0.4]), 1.0, 0.5).item() == pytest.approx(0.3, abs=1e-6)


def test_ties_group_by_batch_order():
    alpha = torch.full((4,), 0.5, requires_grad=True)
    rr = rank_regularization(alpha, 0.7, 0.07)
    assert rr.item() == pytest.approx(0.07)
    rr.backward()
    # The first M = 2 tied samples are the high group: d/d high = -1/2, d/d low = +1/2.
    assert alpha.grad.tolist() == pytest.approx([-0.5, -0.5, 0.5, 0.5])
    assert high_group_mask(alpha, 0.7).tolist() == [True, True, False, False]
    tied = torch.tensor([0.1, 0.7, 0.4, 0.7, 0.7])  # M = 3: the three 0.7s, whatever their place
    assert high_group_mask(tied, 0.7).tolist() == [False, True, False, True, True]
    tied_at_edge = torch.tensor([0.4, 0.9, 0.4, 0.4, 0.1])  # M = 3: 0.9 and the first two 0.4s
    assert high_group_mask(tied_at_edge, 0.7).tolist() == [True, True, True, False, False]


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        rank_regularization(torch.zeros(0), 0.7, 0.07)


def test_total_mixes_with_gamma():
    out = output([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 1.0]], [0.9, 0.2, 0.6, 0.4])
    targets = torch.tensor([0, 0, 1, 1])
    wce = weighted_ce(out.scaled_logits, targets).item()
    released = scn_loss(out, targets, SCNConfig(delta1=0.5))
    assert released.rr.item() == pytest.approx(0.05, abs=1e-6)
    assert released.total.item() == pytest.approx(wce + 0.05, abs=1e-6)  # gamma 0.5 = WCE + RR
    paper = scn_loss(out, targets, SCNConfig(delta1=0.5, gamma=0.2))
    assert paper.total.item() == pytest.approx(2 * (0.2 * 0.05 + 0.8 * wce), abs=1e-6)


def test_global_ranking_matches_one_process_under_gradient_averaging():
    torch.manual_seed(0)
    world, n, classes = 2, 4, 3
    alpha = torch.rand(world * n) * 0.2 + 0.4  # a narrow spread: the hinge is active
    logits = torch.randn(world * n, classes)
    targets = torch.randint(0, classes, (world * n,))
    cfg = SCNConfig(delta1=0.5)

    one = alpha.clone().requires_grad_()
    single = scn_loss(SCNOutput(logits, one, one[:, None] * logits), targets, cfg)
    single.total.backward()
    assert single.rr.item() > 0

    averaged = []
    for r in range(world):
        part = slice(r * n, (r + 1) * n)
        local = alpha[part].clone().requires_grad_()
        gathered = torch.cat([alpha[: r * n], local, alpha[(r + 1) * n :]])  # only the local slice has a gradient
        parts = scn_loss(SCNOutput(logits[part], local, local[:, None] * logits[part]), targets[part], cfg, ranked_alpha=gathered)
        assert parts.rr.item() == pytest.approx(single.rr.item())
        parts.total.backward()
        averaged.append(local.grad / world)  # what DDP's gradient averaging does
    assert torch.allclose(torch.cat(averaged), one.grad, atol=1e-6)


def _eac_output(logits, cam):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    alpha = torch.ones(logits.shape[0])
    return SCNOutput(logits, alpha, logits, torch.as_tensor(cam, dtype=torch.float32))


def test_attention_consistency_is_zero_for_mirrored_maps_and_hand_computed_otherwise():
    cam = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])  # [1, 1, 2, 3]
    assert attention_consistency(cam, cam.flip(-1)).item() == 0.0
    # Not mirrored: the mirror of cam is [[3, 2, 1], [6, 5, 4]]; squared differences 4, 0, 4, 4, 0, 4 over 6 cells.
    assert attention_consistency(cam, cam).item() == pytest.approx(16 / 6)
    with pytest.raises(ValueError, match="maps of one shape"):
        attention_consistency(cam, cam[..., :2])


def test_eac_loss_hand_computed():
    # Two classes, 1x2 maps; the mirror's maps are the view's mirrored except one cell, off by 2.
    cam = [[[[1.0, 0.0]], [[0.0, 3.0]]]]
    mirror_cam = [[[[0.0, 1.0]], [[1.0, 0.0]]]]  # mirrored back: [[1, 0]], [[0, 1]]: class 1 differs by 2 at one cell
    out, mirror = _eac_output([[2.0, 0.0]], cam), _eac_output([[5.0, 5.0]], mirror_cam)
    parts = eac_loss(out, mirror, torch.tensor([1]), lam=5.0)
    ce = math.log(1 + math.exp(2.0))  # CE of [2, 0] at class 1; the mirror's logits get no CE
    assert parts.wce.item() == pytest.approx(ce, abs=1e-6)
    assert parts.rr.item() == 0.0
    assert parts.total.item() == pytest.approx(ce + 5.0 * 4 / 4, abs=1e-6)
    assert eac_loss(out, mirror, torch.tensor([1]), lam=0.0).total.item() == pytest.approx(ce, abs=1e-6)
    with pytest.raises(ValueError, match="cam=True"):
        eac_loss(output([[2.0, 0.0]], [1.0]), mirror, torch.tensor([1]), lam=5.0)


def test_eac_consistency_trains_the_trunk_through_both_views():
    from scn_scale.model import SCNModel

    torch.manual_seed(0)
    model = SCNModel(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    out, mirror = model(x, cam=True), model(x.flip(-1), cam=True)
    parts = eac_loss(out, mirror, torch.tensor([0, 2]), lam=2.0)
    consistency = attention_consistency(out.cam, mirror.cam)
    assert consistency.item() > 0  # an untrained network does not see a mirror image mirrored
    assert (parts.total - parts.wce).item() == pytest.approx(2.0 * consistency.item(), rel=1e-5)
    consistency.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # the maps' weights are detached
