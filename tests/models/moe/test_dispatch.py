"""The fast sort-by-expert dispatch against a plain per-token reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetool.models.moe import (
    MoEBlock,
    MoEConfig,
    dispatch_combine,
    recording_router_logits,
    route,
)


class Gated(nn.Module):
    def __init__(self, d=16, f=24):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TwoLayer(nn.Module):
    def __init__(self, d=16, f=24):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def reference_moe(x, expert_index, weights, experts, keep=None):
    """Token by token: out[t] = sum_j w[t, j] * expert[idx[t, j]](x[t])."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(expert_index.shape[1]):
            if keep is None or keep[t, j]:
                acc = acc + weights[t, j] * experts[expert_index[t, j]](x[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("mlp_class", [Gated, TwoLayer])
@pytest.mark.parametrize(("top_k", "capacity"), [(1, None), (2, None), (2, 5), (3, 7)])
def test_dispatch_matches_reference_outputs_and_gradients(mlp_class, top_k, capacity):
    torch.manual_seed(0)
    experts = nn.ModuleList(mlp_class() for _ in range(4))
    experts_ref = copy.deepcopy(experts)
    x = torch.randn(23, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    router = torch.randn(16, 4, requires_grad=True)
    router_ref = router.detach().clone().requires_grad_(True)

    r = route(x @ router, top_k, capacity=capacity)
    out = dispatch_combine(x, r.expert_index, r.combine_weight, experts, r.keep)
    r_ref = route(x_ref @ router_ref, top_k, capacity=capacity)
    out_ref = reference_moe(
        x_ref, r_ref.expert_index, r_ref.combine_weight, experts_ref, r_ref.keep
    )
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(router.grad, router_ref.grad, atol=1e-5, rtol=1e-5)
    for p, p_ref in zip(experts.parameters(), experts_ref.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5)


def test_expert_without_tokens_gets_zero_gradient_not_none():
    experts = nn.ModuleList(Gated() for _ in range(3))
    x = torch.randn(4, 16)
    idx = torch.zeros(4, 1, dtype=torch.long)
    out = dispatch_combine(x, idx, torch.ones(4, 1), experts)
    out.sum().backward()
    assert all(p.grad is not None for p in experts[2].parameters())
    assert all(p.grad.abs().sum() == 0 for p in experts[2].parameters())


def test_upcycled_block_equals_its_dense_mlp():
    torch.manual_seed(1)
    mlp = Gated()
    dense = copy.deepcopy(mlp)
    block = MoEBlock.upcycle(mlp, 16, MoEConfig(num_experts=4, top_k=2))
    nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(block(x), dense(x), atol=1e-6, rtol=1e-5)


def test_block_is_stateless_and_its_router_logits_are_recorded():
    torch.manual_seed(2)
    block = MoEBlock.upcycle(TwoLayer(), 16, MoEConfig(num_experts=4, top_k=2)).train()
    before = dict(vars(block))
    x = torch.randn(1, 3, 16, requires_grad=True)
    block(x).sum().backward()  # outside a recording: nothing is kept anywhere
    with recording_router_logits() as logits:
        out = block(x)
    assert vars(block).keys() == before.keys()
    assert all(vars(block)[k] is v for k, v in before.items())  # no attribute written
    assert len(logits) == 1 and logits[0].shape == (3, 4) and logits[0].dtype == torch.float32
    torch.testing.assert_close(logits[0], x.detach().reshape(3, 16) @ block.router.weight.t())
    routing = block.routing(logits[0])
    expected = sum(
        routing.combine_weight[:, j : j + 1]
        * torch.stack([block.experts[e](x[0, t]) for t, e in enumerate(routing.expert_index[:, j])])
        for j in range(2)
    )
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-5)


def test_capacity_applies_in_training_only_by_default():
    block = MoEBlock.upcycle(TwoLayer(), 16, MoEConfig(4, 2, capacity_factor=0.5))
    assert block.train().capacity(100) == 25
    assert block.eval().capacity(100) is None
    block = MoEBlock.upcycle(TwoLayer(), 16, MoEConfig(4, 2, eval_capacity_factor=2.0))
    assert block.eval().capacity(100) == 100


def _calls(block):
    """Count each expert's forward calls."""
    calls = [0] * len(block.experts)
    for i, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _one_token_block():
    torch.manual_seed(3)
    block = MoEBlock.upcycle(Gated(), 16, MoEConfig(num_experts=8, top_k=2))
    nn.init.normal_(block.router.weight, std=1.0)
    return block.eval(), torch.randn(1, 1, 16)  # one decoded token: 2 of 8 experts


def test_inference_skips_experts_without_tokens_and_gives_the_same_output():
    block, x = _one_token_block()
    calls = _calls(block)
    with_grad = block(x)
    assert calls == [1] * 8  # autograd: every expert stays in the graph
    with torch.no_grad():
        without_grad = block(x)
    assert sum(c == 2 for c in calls) == 2  # only the token's two experts ran again
    torch.testing.assert_close(without_grad, with_grad, atol=0, rtol=0)


def test_inference_calls_every_expert_under_zero3_partitioning():
    block, x = _one_token_block()
    for p in block.parameters():
        p.ds_id = 0  # what deepspeed.zero.Init leaves on partitioned parameters
    calls = _calls(block)
    with torch.no_grad():
        block(x)
    assert calls == [1] * 8


def test_dispatch_with_every_assignment_dropped_is_zero():
    experts = nn.ModuleList(Gated() for _ in range(3))
    x = torch.randn(4, 16)
    idx = torch.zeros(4, 2, dtype=torch.long)
    keep = torch.zeros(4, 2, dtype=torch.bool)
    with torch.no_grad():
        out = dispatch_combine(x, idx, torch.ones(4, 2), experts, keep, skip_empty=True)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize(("top_k", "capacity"), [(1, None), (2, None), (3, None), (2, 1)])
def test_one_token_inference_path_equals_the_sorted_dispatch(top_k, capacity):
    torch.manual_seed(5)
    experts = nn.ModuleList(TwoLayer() for _ in range(6))
    x = torch.randn(1, 16)
    r = route(torch.randn(1, 6), top_k, capacity=capacity)
    keep = r.keep if capacity is None else torch.tensor([[True, False]])
    with torch.no_grad():
        fast = dispatch_combine(x, r.expert_index, r.combine_weight, experts, keep, skip_empty=True)
        plain = dispatch_combine(x, r.expert_index, r.combine_weight, experts, keep)
        ref = reference_moe(x, r.expert_index, r.combine_weight, experts, keep)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    if top_k <= 2:  # two terms add in either order to the same bits
        assert torch.equal(fast, plain)


def test_top1_weight_is_the_raw_probability_and_carries_a_gradient():
    logits = torch.randn(6, 4, requires_grad=True)
    raw = route(logits, 1, normalize=False)
    torch.testing.assert_close(raw.combine_weight[:, 0], torch.softmax(logits, -1).max(-1).values)
    raw.combine_weight.sum().backward()
    assert logits.grad.abs().max() > 0
    # Renormalising a single weight gives 1 for every token: no gradient reaches the router.
    logits.grad = None
    renormalised = route(logits, 1, normalize=True)
    assert torch.equal(renormalised.combine_weight, torch.ones(6, 1))
    renormalised.combine_weight.sum().backward()
    assert logits.grad is None or logits.grad.abs().max() == 0
