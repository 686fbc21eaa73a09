"""Where the MoE layer's time above 2.0x goes: the GEMMs of E experts alone against the dense FFN.

Times, with plain ``torch.mm`` and no autograd, the nine GEMMs of one SwiGLU FFN's forward and
backward (gate, up, down; input and weight gradients) on all tokens (the dense FFN), against the
same nine GEMMs per expert on an equal share of top-2's assignments (E experts, 2 x tokens / E
rows each) -- with distinct weights per expert, and with one weight set shared by every expert
(so the weights stay in cache; if that were faster, weight traffic would be the cost). Also
times the modules themselves (autograd, element-wise ops included) the same three ways.
Setting as benchmarks/moe_layer.py: d_model 512, FFN 2048, 4096 tokens, 2 threads, fp32.
Prints JSON: median seconds and ratios to the dense case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from moe_layer import ExpertsAlone, SwiGLU, time_fwd_bwd


def gemm_operands(rows: int, d_model: int, ffn: int) -> dict[str, torch.Tensor]:
    names = {"x": (rows, d_model), "h": (rows, ffn), "dy": (rows, d_model), "dh": (rows, ffn)}
    return {name: torch.randn(*shape) for name, shape in names.items()}


def gemm_weights(d_model: int, ffn: int) -> dict[str, torch.Tensor]:
    return {
        "gate": torch.randn(ffn, d_model),
        "up": torch.randn(ffn, d_model),
        "down": torch.randn(d_model, ffn),
    }


def swiglu_gemms(a: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> None:
    """The nine GEMMs of a SwiGLU FFN's forward and backward, shaped as autograd runs them."""
    torch.mm(a["x"], w["gate"].t())
    torch.mm(a["x"], w["up"].t())
    torch.mm(a["h"], w["down"].t())
    torch.mm(a["dy"], w["down"])
    torch.mm(a["dy"].t(), a["h"])
    for name in ("gate", "up"):
        torch.mm(a["dh"], w[name])
        torch.mm(a["dh"].t(), a["x"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, f, e = args.d_model, args.ffn, args.experts
    rows = 2 * args.tokens // e  # top-2: each expert's equal share of the assignments
    dense_ops, dense_w = gemm_operands(args.tokens, d, f), gemm_weights(d, f)
    expert_ops = [gemm_operands(rows, d, f) for _ in range(e)]
    distinct_w = [gemm_weights(d, f) for _ in range(e)]
    shared_w = [dense_w] * e
    x = torch.randn(args.tokens, d, requires_grad=True)
    dense = SwiGLU(d, f)
    blocks, block_rows = [rows] * e, torch.randn(rows * e, d)
    distinct = ExpertsAlone([SwiGLU(d, f) for _ in range(e)], blocks, block_rows)
    shared = ExpertsAlone([dense] * e, blocks, block_rows)
    cases = {
        "gemms_dense": lambda: swiglu_gemms(dense_ops, dense_w),
        "gemms_experts_distinct": lambda: [
            swiglu_gemms(a, w) for a, w in zip(expert_ops, distinct_w, strict=True)
        ],
        "gemms_experts_shared": lambda: [
            swiglu_gemms(a, w) for a, w in zip(expert_ops, shared_w, strict=True)
        ],
        "modules_dense": lambda: time_fwd_bwd(dense, x, 1),
        "modules_experts_distinct": lambda: time_fwd_bwd(distinct, x, 1),
        "modules_experts_shared": lambda: time_fwd_bwd(shared, x, 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in samples.items()}
    ratio = {
        name: median[name] / median[name.split("_")[0] + "_dense"]
        for name in median
        if not name.endswith("_dense")
    }
    result = {
        "setting": {
            "d_model": d,
            "ffn": f,
            "tokens": args.tokens,
            "experts": e,
            "rows_per_expert": rows,
            "threads": args.threads,
            "dtype": "fp32",
            "samples": args.rounds,
        },
        "seconds_median": median,
        "ratio_to_dense": ratio,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
