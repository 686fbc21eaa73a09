"""POPE generation throughput (samples/s) of a sparse model against its dense parent (same tiny
preset), at batch 1 and 8, in one run. Prints JSON.

Both models answer the same synthetic POPE questions through ``moetool.models.inference.answer``
(prompt building, image padding, batched greedy generation with KV cache), as `moetool eval pope`
runs them, with a fixed number of new tokens per sample. The sparse model is also
timed as it decoded before experts without tokens were skipped and router losses left out of
decoding (``moe_as_before``). Cases take turns pass by pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


@contextlib.contextmanager
def as_before(enabled: bool = True):
    """Decoding as it ran before: every expert called (no one-token path), router losses
    computed. Yields the extra ``generate`` arguments that asks for."""
    from moetool.models.moe import MoEBlock

    saved = MoEBlock._may_skip_empty_experts
    if enabled:
        MoEBlock._may_skip_empty_experts = lambda self: False
    try:
        yield {"router_losses": True} if enabled else {}
    finally:
        MoEBlock._may_skip_empty_experts = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from moetool.data.synth import SynthConfig, generate
    from moetool.models.build import save_checkpoint
    from moetool.models.inference import answer, load_checkpoint
    from moetool.models.moe.config import MoEConfig
    from moetool.tiny import build_random_lvlm, preset_recipe
    from moetool.upcycle import upcycle_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moetool-eval-bench-"))
    generate(work / "data", SynthConfig(stage1=4, stage2=4, stage3=4, eval_images=16))
    model, processor = build_random_lvlm(preset_recipe(args.preset))
    save_checkpoint(model, processor, work / "dense")
    upcycle_checkpoint(work / "dense", work / "moe", MoEConfig(router_std=0.5))
    questions = json.loads((work / "data/eval/pope_random.json").read_text())[: args.samples]

    def one_pass(model, processor, batch: int, before: bool) -> float:
        start = time.perf_counter()
        with as_before(before) as extra:
            for i in range(0, len(questions), batch):
                chunk = questions[i : i + batch]
                answer(
                    model,
                    processor,
                    [q["question"] for q in chunk],
                    [[Image.open(work / "data" / q["image"])] for q in chunk],
                    max_new_tokens=args.max_new_tokens,
                    generate_kwargs={"min_new_tokens": args.max_new_tokens, **extra},
                )
        return len(questions) / (time.perf_counter() - start)

    models = {
        "dense": load_checkpoint(str(work / "dense")),
        "moe": load_checkpoint(str(work / "moe")),
    }
    cases = {"dense": ("dense", False), "moe": ("moe", False), "moe_as_before": ("moe", True)}
    result = {
        "preset": args.preset,
        "samples": len(questions),
        "new_tokens_per_sample": args.max_new_tokens,
        "samples_per_s": {},
    }
    for batch in (1, 8):
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for which, before in cases.values():  # warm-up
            one_pass(*models[which], batch, before)
        for _ in range(args.rounds):  # interleaved, so drift falls on every case alike
            for name, (which, before) in cases.items():
                runs[name].append(one_pass(*models[which], batch, before))
        median = {name: statistics.median(r) for name, r in runs.items()}
        result["samples_per_s"][f"batch_{batch}"] = {
            **median,
            "moe_over_dense": median["moe"] / median["dense"],
            "moe_as_before_over_dense": median["moe_as_before"] / median["dense"],
        }
    result["moe_block_one_token_us"] = block_decode_us(models["moe"][0], args.rounds)
    print(json.dumps(result, indent=2))


def block_decode_us(model, rounds: int, calls: int = 500) -> dict[str, float]:
    """Microseconds per forward of one MoE block on one decoded token, now and with every
    expert called as before (the block computes no loss either way: the model does),
    interleaved."""
    block = model.moe_blocks()[0]
    x = torch.randn(1, 1, block.router.in_features)

    def timed(before: bool) -> float:
        with as_before(before), torch.no_grad():
            start = time.perf_counter()
            for _ in range(calls):
                block(x)
        return (time.perf_counter() - start) / calls * 1e6

    runs: dict[str, list[float]] = {"now": [], "as_before": []}
    for _ in range(rounds + 1):
        runs["now"].append(timed(False))
        runs["as_before"].append(timed(True))
    median = {name: statistics.median(r[1:]) for name, r in runs.items()}  # first: warm-up
    return {**median, "now_over_before": median["now"] / median["as_before"]}


if __name__ == "__main__":
    main()
