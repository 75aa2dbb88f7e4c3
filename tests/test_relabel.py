import itertools
import math

import pytest
import torch

from scn_scale.config import SCNConfig
from scn_scale.model import SCNOutput
from scn_scale.relabel import Proposal, ProposalRows, propose_relabels, reduce_proposals


def output(scaled_logits, alpha):
    scaled = torch.as_tensor(scaled_logits, dtype=torch.float32)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    return SCNOutput(scaled / alpha[:, None], alpha, scaled)


def two_class_logit(margin):
    """Scaled logits [s, 0] whose p_0 - p_1 is `margin` (p_0 - p_1 = tanh(s / 2))."""
    return [2 * math.atanh(margin), 0.0]


def test_fires_exactly_above_delta2():
    cfg = SCNConfig(delta2=0.2, relabel_epoch=1)
    out = output([two_class_logit(0.2 + 1e-4), two_class_logit(0.2 - 1e-4), two_class_logit(0.9)], [0.5, 0.5, 0.5])
    labels = torch.tensor([1, 1, 0], dtype=torch.int32)  # the third already has its argmax label: margin 0
    proposals = propose_relabels(["a", "b", "c"], labels, out, 1, cfg).to_list()
    assert [p.key for p in proposals] == ["a"]
    p = proposals[0]
    assert (p.old_label, p.new_label, p.epoch) == (1, 0, 1) and type(p.old_label) is int
    assert p.margin == pytest.approx(0.2 + 1e-4, abs=1e-6)


def test_margin_equal_to_delta2_does_not_fire():
    out = output([two_class_logit(0.3)], [0.5])
    margin = torch.softmax(out.scaled_logits.double(), 1)[0].tolist()
    exact = margin[0] - margin[1]
    labels = torch.tensor([1])
    assert propose_relabels(["a"], labels, out, 5, SCNConfig(delta2=exact, relabel_epoch=1)).to_list() == []
    assert len(propose_relabels(["a"], labels, out, 5, SCNConfig(delta2=math.nextafter(exact, 0), relabel_epoch=1)).to_list()) == 1


def test_never_before_the_start_epoch():
    out = output([[5.0, 0.0, 0.0]], [0.5])
    labels = torch.tensor([2])
    cfg = SCNConfig(relabel_epoch=10)
    assert propose_relabels(["a"], labels, out, 9, cfg) is None
    assert [p.new_label for p in propose_relabels(["a"], labels, out, 10, cfg).to_list()] == [0]


def test_uses_the_alpha_scaled_probabilities():
    # Unscaled logits [2, 0] (margin 0.76) scaled by alpha 0.1 to [0.2, 0] (margin 0.0997): no relabel.
    out = SCNOutput(torch.tensor([[2.0, 0.0]]), torch.tensor([0.1]), torch.tensor([[0.2, 0.0]]))
    assert propose_relabels(["a"], torch.tensor([1]), out, 10, SCNConfig()).to_list() == []


def test_scope_low_relabels_only_the_low_group():
    confident = two_class_logit(0.9)
    alpha = [0.9, 0.1, 0.8, 0.2, 0.7]  # M = int(3.5) = 3: high = samples 0, 2, 4
    out = output([confident] * 5, alpha)
    labels = torch.ones(5, dtype=torch.long)
    keys = list("abcde")
    assert [p.key for p in propose_relabels(keys, labels, out, 10, SCNConfig(relabel_scope="all")).to_list()] == keys
    assert [p.key for p in propose_relabels(keys, labels, out, 10, SCNConfig(relabel_scope="low")).to_list()] == ["b", "d"]


def test_scope_low_with_global_ranking():
    confident = two_class_logit(0.9)
    local_alpha = torch.tensor([0.5, 0.3])
    # Global batch of 4: [0.9, 0.8 | 0.5, 0.3]; M = int(2.8) = 2 -> both local samples are low.
    ranked = torch.tensor([0.9, 0.8, 0.5, 0.3])
    out = output([confident] * 2, local_alpha)
    labels = torch.ones(2, dtype=torch.long)
    cfg = SCNConfig(relabel_scope="low")
    assert [p.key for p in propose_relabels(["a", "b"], labels, out, 10, cfg).to_list()] == ["b"]  # locally "a" is high
    assert [p.key for p in propose_relabels(["a", "b"], labels, out, 10, cfg, ranked_alpha=ranked, local_offset=2).to_list()] == ["a", "b"]
    # Placed first, the same values are the global high group.
    first = torch.tensor([0.5, 0.3, 0.2, 0.1])
    assert propose_relabels(["a", "b"], labels, out, 10, cfg, ranked_alpha=first, local_offset=0).to_list() == []
    with pytest.raises(ValueError, match="local_offset"):
        propose_relabels(["a", "b"], labels, out, 10, cfg, ranked_alpha=ranked)
    with pytest.raises(ValueError, match="local_offset 3"):
        propose_relabels(["a", "b"], labels, out, 10, cfg, ranked_alpha=ranked, local_offset=3)


def test_shape_mismatch_is_an_error():
    out = output([[1.0, 0.0]], [0.5])
    with pytest.raises(ValueError):
        propose_relabels(["a", "b"], torch.tensor([0, 1]), out, 10, SCNConfig())


def test_reduce_is_order_independent():
    proposals = [
        Proposal("k", 0, 1, 0.5, 10),
        Proposal("k", 0, 2, 0.7, 10),
        Proposal("k", 0, 3, 0.7, 10),
        Proposal("k", 0, 4, 0.3, 11),
        Proposal("j", 2, 1, 0.4, 10),
        Proposal("j", 2, 0, 0.4, 10),
    ]
    results = {tuple(sorted(reduce_proposals(perm).items())) for perm in itertools.permutations(proposals)}
    assert len(results) == 1
    best = reduce_proposals(proposals)
    assert best["k"] == Proposal("k", 0, 4, 0.3, 11)  # the latest epoch wins
    assert best["j"] == Proposal("j", 2, 0, 0.4, 10)  # a tie in margin goes to the smaller label
    del proposals[3]
    assert reduce_proposals(proposals)["k"] == Proposal("k", 0, 2, 0.7, 10)  # then the larger margin


def test_rows_reduce_by_the_same_order_as_proposals():
    # One epoch; rows 0 and 1 stand for keys "k" and "j"; ties in margin, then in new label.
    proposals = [Proposal(k, old, new, m, 10) for k, old, new, m in itertools.product("kj", (0, 1), (2, 3), (0.5, 0.7))]
    row = {"k": 0, "j": 1}
    expected = {row[k]: (p.old_label, p.new_label, p.margin) for k, p in reduce_proposals(proposals).items()}
    assert expected == {0: (0, 2, 0.7), 1: (0, 2, 0.7)}
    for seed in range(20):
        perm = [proposals[i] for i in torch.randperm(len(proposals), generator=torch.Generator().manual_seed(seed))]
        reduced = ProposalRows.of(10, [row[p.key] for p in perm], [p.old_label for p in perm],
                                  [p.new_label for p in perm], [p.margin for p in perm]).reduced()
        columns = (reduced.rows, reduced.old_label, reduced.new_label, reduced.margin)
        assert {r: (o, n, m) for r, o, n, m in zip(*(c.tolist() for c in columns))} == expected
