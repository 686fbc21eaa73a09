"""Forward+backward time of moetool's MoE block against the dense FFN it came from and two
reference implementations, in one run.

Setting (issue #3): d_model 512, FFN 2048 SwiGLU, 4096 tokens, top-2 of 4 and of 16 experts,
2 threads, fp32. References written here:
- capacity/einsum dispatch (GShard / DeepSpeed-MoE style, capacity factor 1.0 so that its
  tensors are those DeepSpeed builds; it drops overflow tokens, so it does less work than a
  dropless layer);
- a Python loop over experts indexing stacked 3-D expert weights under autograd (transformers v5
  eager style).
Also timed: the block with its router losses computed from the recorded logits, as the sparse
model computes them in training (the block itself computes none); and the block's experts alone
on the token blocks routing gave them (no router, no gather, no combine) -- the floor for any
implementation that runs the backbone's own MLP modules,
which shows how much of the ratio is the experts' GEMMs at their smaller size and how much is
routing and dispatch.
Prints JSON: median seconds per fwd+bwd, ratios to the dense FFN (of medians, and of the
fastest runs), and the block's median over the experts-alone median (what dispatch adds).
Run with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 for steadier timings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from moetool.models.moe import MoEBlock, MoEConfig, recording_router_logits, router_losses


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """Experts as stacked (E, …) weights, as transformers v5 MoE models hold them."""

    def __init__(self, mlp: SwiGLU, num_experts: int):
        super().__init__()
        self.gate = nn.Parameter(mlp.gate_proj.weight.detach().repeat(num_experts, 1, 1))
        self.up = nn.Parameter(mlp.up_proj.weight.detach().repeat(num_experts, 1, 1))
        self.down = nn.Parameter(mlp.down_proj.weight.detach().repeat(num_experts, 1, 1))
        self.router = nn.Linear(mlp.gate_proj.in_features, num_experts, bias=False)

    def expert(self, e: int, h):
        return F.linear(F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e]), self.down[e])


class LoopStacked(StackedExperts):
    """Python loop over experts, each indexing the stacked weights (eager style)."""

    def forward(self, x):
        probs = torch.softmax(self.router(x).float(), -1)
        weights, index = probs.topk(2, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.gate.shape[0]):
            token, slot = torch.where(index == e)
            if token.numel():
                y = self.expert(e, x[token]) * weights[token, slot].unsqueeze(-1)
                out = out.index_add(0, token, y)
        return out


class CapacityEinsum(StackedExperts):
    """GShard / DeepSpeed top-2 gating: one-hot dispatch and combine tensors of shape
    (tokens, experts, capacity) and einsums."""

    capacity_factor = 1.0

    def forward(self, x):
        tokens, _ = x.shape
        num_experts = self.gate.shape[0]
        capacity = math.ceil(2 * tokens * self.capacity_factor / num_experts)
        probs = torch.softmax(self.router(x).float(), -1)
        top = probs.topk(2, -1)
        masks = [F.one_hot(top.indices[:, j], num_experts) for j in range(2)]
        locations1 = torch.cumsum(masks[0], 0) - 1
        locations2 = torch.cumsum(masks[1], 0) - 1 + masks[0].sum(0, keepdim=True)
        masks = [masks[0] * (locations1 < capacity), masks[1] * (locations2 < capacity)]
        loc = [(locations1 * masks[0]).sum(1), (locations2 * masks[1]).sum(1)]
        gates = [(probs * m).sum(1) for m in masks]
        denom = torch.clamp(gates[0] + gates[1], min=torch.finfo(probs.dtype).eps)
        combine = sum(
            (g / denom).unsqueeze(1).unsqueeze(2)
            * m.unsqueeze(2).float()
            * F.one_hot(lo, capacity).unsqueeze(1).float()
            for g, m, lo in zip(gates, masks, loc, strict=True)
        ).to(x.dtype)
        dispatch = combine.bool().to(x.dtype)
        dispatched = torch.einsum("sec,sm->ecm", dispatch, x)
        h = torch.bmm(dispatched, self.gate.transpose(1, 2))
        u = torch.bmm(dispatched, self.up.transpose(1, 2))
        y = torch.bmm(F.silu(h) * u, self.down.transpose(1, 2))
        return torch.einsum("sec,ecm->sm", combine, y)


class ExpertsAlone(nn.Module):
    """Expert modules on fixed, already-sorted blocks of rows: no routing, no dispatch."""

    def __init__(self, experts: list[nn.Module], counts: list[int], rows: torch.Tensor):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.counts = counts
        # Pre-gathered input rows (a leaf, so its gradient is computed as the block's is).
        self.rows = rows.detach()[: sum(counts)].clone().requires_grad_()

    @classmethod
    def routed(cls, block: MoEBlock, x: torch.Tensor) -> ExpertsAlone:
        """The block's experts on the token blocks its routing gives ``x``."""
        with torch.no_grad():
            routing = block.routing(block.router(x))
        counts = torch.bincount(routing.expert_index.reshape(-1), minlength=len(block.experts))
        return cls(list(block.experts), counts.tolist(), x.repeat(2, 1))  # top-2: 2 rows a token

    def forward(self, x):
        self.rows.grad = None
        blocks = self.rows.split(self.counts)
        return torch.cat([e(b) for e, b in zip(self.experts, blocks, strict=True)])


class BlockWithLosses(nn.Module):
    """The block as a training step runs it: its router logits recorded and the aux and z
    losses computed from them (as the sparse model does) and added to the output's sum."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        with recording_router_logits() as logits:
            out = self.block(x)
        aux, z = router_losses(logits)
        return out + (0.01 * aux + 0.001 * z) / out.numel()


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        module(x).sum().backward()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="samples per module per round")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    dense = SwiGLU(args.d_model, args.ffn)
    median: dict[str, float] = {}
    ratio: dict[str, float] = {}
    ratio_min: dict[str, float] = {}
    over_floor: dict[str, float] = {}
    for e in args.experts:
        # One group per expert count, interleaved with the dense FFN and freed afterwards, so
        # every ratio compares modules measured side by side in the same memory state.
        block = MoEBlock.upcycle(
            SwiGLU(args.d_model, args.ffn), args.d_model, MoEConfig(num_experts=e, top_k=2)
        )
        loop, einsum = LoopStacked(dense, e), CapacityEinsum(dense, e)
        for m in (block, loop, einsum):
            nn.init.normal_(m.router.weight, std=0.5)  # spread tokens over experts
        group = {
            "dense": dense,
            f"moetool_e{e}": block,
            f"moetool_with_losses_e{e}": BlockWithLosses(block),
            f"experts_alone_e{e}": ExpertsAlone.routed(block, x),
            f"loop_stacked_e{e}": loop,
            f"capacity_einsum_e{e}": einsum,
        }
        samples: dict[str, list[float]] = {name: [] for name in group}
        for module in group.values():  # warm-up
            time_fwd_bwd(module, x, 1)
        for _ in range(args.rounds):
            for name, module in group.items():
                samples[name] += time_fwd_bwd(module, x, args.repeats)
        group_median = {name: statistics.median(t) for name, t in samples.items()}
        group_min = {name: min(t) for name, t in samples.items()}
        median[f"dense_with_e{e}"] = group_median.pop("dense")
        for name, value in group_median.items():
            median[name] = value
            ratio[name] = value / median[f"dense_with_e{e}"]
            ratio_min[name] = group_min[name] / group_min["dense"]
        # What routing, gather and combine add to the experts' own work.
        over_floor[f"e{e}"] = group_median[f"moetool_e{e}"] / group_median[f"experts_alone_e{e}"]
        del block, loop, einsum, group
    result = {
        "setting": {
            "d_model": args.d_model,
            "ffn": args.ffn,
            "tokens": args.tokens,
            "top_k": 2,
            "threads": args.threads,
            "dtype": "fp32",
            "samples": args.repeats * args.rounds,
        },
        "seconds_median": median,
        "ratio_to_dense": ratio,
        "ratio_to_dense_of_fastest_runs": ratio_min,
        "moetool_over_experts_alone": over_floor,
        "goal_moetool_over_dense_max": 2.10,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
