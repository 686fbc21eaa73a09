import math

import pytest
import torch

from moetool.models.moe import (
    batch_priority_keep,
    expert_capacity,
    load_balancing_loss,
    route,
    router_z_loss,
)


def test_topk_weights_renormalised_or_raw():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    probs = torch.softmax(logits, -1)
    r = route(logits, top_k=2, normalize=True)
    assert r.expert_index.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(r.combine_weight.sum(-1), torch.ones(2))
    raw = route(logits, top_k=2, normalize=False)
    torch.testing.assert_close(raw.combine_weight, probs.gather(1, raw.expert_index))
    assert r.keep is None


def test_router_runs_in_fp32():
    r = route(torch.randn(5, 4, dtype=torch.bfloat16), top_k=2)
    assert r.probs.dtype == torch.float32 and r.combine_weight.dtype == torch.float32


def test_capacity_formula():
    assert expert_capacity(100, 4, 2, 1.5) == math.ceil(2 * 100 * 1.5 / 4)
    assert expert_capacity(10, 4, 2, 0.1, min_capacity=4) == 4


@pytest.mark.parametrize("seed", range(5))
def test_capacity_never_exceeded(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(257, 8, generator=g) * 3
    logits[:, 3] += 2  # a popular expert
    capacity = expert_capacity(257, 8, 2, 1.0)
    r = route(logits, top_k=2, capacity=capacity)
    kept_experts = r.expert_index[r.keep]
    loads = torch.bincount(kept_experts, minlength=8)
    assert loads.max() <= capacity
    assert (~r.keep).any(), "the popular expert must overflow in this construction"


def test_nothing_dropped_when_capacity_covers_all_tokens():
    logits = torch.randn(64, 4)
    r = route(logits, top_k=2, capacity=64)
    assert r.keep.all()


def test_higher_top1_weight_wins_a_contested_slot():
    # Three tokens all want expert 0 first; capacity 1: the most confident one gets it.
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    r = route(logits, top_k=1, capacity=1)
    assert r.keep[:, 0].tolist() == [False, True, False]


def test_first_choices_claim_slots_before_second_choices():
    # Token 0 (most confident) has expert 1 as its second choice; token 1 has expert 1 as its
    # first choice. With capacity 1, token 1's first choice wins over token 0's second.
    logits = torch.tensor([[5.0, 1.0, -9.0], [-9.0, 2.0, 1.0]])
    r = route(logits, top_k=2, capacity=1)
    assert r.expert_index.tolist() == [[0, 1], [1, 2]]
    assert r.keep.tolist() == [[True, False], [True, True]]


def test_batch_priority_keep_matches_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    expert_index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(50)])
    priority = torch.rand(50, generator=g)
    keep = batch_priority_keep(expert_index, priority, 6, capacity=9)
    used = [0] * 6
    expected = torch.zeros(50, 2, dtype=torch.bool)
    order = sorted(range(50), key=lambda t: -priority[t].item())
    for j in range(2):
        for t in order:
            e = expert_index[t, j].item()
            if used[e] < 9:
                used[e] += 1
                expected[t, j] = True
    assert torch.equal(keep, expected)


def test_aux_loss_is_exactly_one_when_perfectly_balanced():
    # 8 tokens, 4 experts: each expert is the argmax of two tokens, and the mean probability of
    # every expert is 1/4.
    logits = torch.full((8, 4), -2.0)
    for t in range(8):
        logits[t, t % 4] = 2.0
    r = route(logits, top_k=2)
    assert load_balancing_loss(r.probs, r.expert_index).item() == pytest.approx(1.0, abs=1e-6)
    uniform = route(torch.zeros(12, 4), top_k=1)
    assert load_balancing_loss(
        uniform.probs, torch.arange(12).remainder(4).unsqueeze(1)
    ).item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_grows_with_imbalance_and_ignores_masked_tokens():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 5.0  # everything to expert 0
    r = route(logits, top_k=2)
    collapsed = load_balancing_loss(r.probs, r.expert_index).item()
    assert collapsed > 3.0
    balanced = torch.full((8, 4), -2.0)
    for t in range(8):
        balanced[t, t % 4] = 2.0
    mixed = torch.cat([balanced, logits])
    rm = route(mixed, top_k=2)
    mask = torch.tensor([True] * 8 + [False] * 8)
    assert load_balancing_loss(rm.probs, rm.expert_index, mask).item() == pytest.approx(
        1.0, abs=1e-6
    )


def test_z_loss_golden_value():
    # ST-MoE's z-loss, mean over tokens of logsumexp(logits)^2, by hand:
    # (log 2)^2 = 0.480453 and (2 + log(1 + e^-1))^2 = 5.351180; their mean is 2.915816.
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.915816, abs=1e-6)
