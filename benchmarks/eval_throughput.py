"""POPE generation throughput (samples/s) of a sparse model against its dense parent (same tiny
preset), at batch 1 and 8, in one run. Prints JSON.

Both models answer the same synthetic POPE questions with the plugin's own prompt building and
batched greedy generation (KV cache), as `moetool eval pope` runs them. The sparse model is also
timed with every expert called on every step (``moe_every_expert``), as it ran before experts
without tokens were skipped in inference.
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
    from moetool.eval.lmms_model import build_prompt, load_checkpoint
    from moetool.models.build import build_random_lvlm, save_checkpoint
    from moetool.models.presets import preset_recipe
    from moetool.upcycle import UpcycleOptions, upcycle_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moetool-eval-bench-"))
    generate(work / "data", SynthConfig(stage1=4, stage2=4, stage3=4, eval_images=16))
    model, processor = build_random_lvlm(preset_recipe(args.preset))
    save_checkpoint(model, processor, work / "dense")
    upcycle_checkpoint(work / "dense", work / "moe", UpcycleOptions(router_std=0.5))
    questions = json.loads((work / "data/eval/pope_random.json").read_text())[: args.samples]

    def throughput(path: Path, batch: int) -> float:
        model, processor = load_checkpoint(str(path))
        tokenizer = processor.tokenizer
        runs = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i in range(0, len(questions), batch):
                chunk = questions[i : i + batch]
                images = [Image.open(work / "data" / q["image"]).convert("RGB") for q in chunk]
                prompts = [build_prompt(tokenizer, q["question"], 1) for q in chunk]
                inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
                with torch.no_grad():
                    model.generate(
                        **inputs,
                        max_new_tokens=args.max_new_tokens,
                        do_sample=False,
                        min_new_tokens=args.max_new_tokens,
                        use_cache=True,
                        pad_token_id=tokenizer.pad_token_id,
                    )
            runs.append(len(questions) / (time.perf_counter() - start))
        return statistics.median(runs)

    from moetool.models.moe import MoEBlock

    @contextlib.contextmanager
    def every_expert_called():
        saved = MoEBlock._may_skip_empty_experts
        MoEBlock._may_skip_empty_experts = lambda self: False
        try:
            yield
        finally:
            MoEBlock._may_skip_empty_experts = saved

    result = {
        "preset": args.preset,
        "samples": len(questions),
        "new_tokens_per_sample": args.max_new_tokens,
        "samples_per_s": {},
    }
    for batch in (1, 8):
        dense = throughput(work / "dense", batch)
        sparse = throughput(work / "moe", batch)
        with every_expert_called():
            every = throughput(work / "moe", batch)
        result["samples_per_s"][f"batch_{batch}"] = {
            "dense": dense,
            "moe": sparse,
            "moe_every_expert": every,
            "moe_over_dense": sparse / dense,
            "moe_every_expert_over_dense": every / dense,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
