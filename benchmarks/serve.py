"""Generation throughput: vLLM (CPU) against transformers ``generate`` on the same exported MoE
LLaVA, batch 1 and 16, in one run. Prints JSON.

A random qwen2-base LLaVA (``--hidden``, ``--layers``; head dim 32), upcycled to ``--experts``
experts top-2 in every other layer (Drop-Upcycling, so the experts differ) and exported with
``moetool export --to native`` (qwen2_moe). Each prompt has one image; every request generates
``--max-tokens`` tokens greedily (EOS ignored). Timed: the generate calls after one warm-up call
(model loading excluded), the best of ``--repeats``. transformers runs the moetool checkpoint
(what ``moetool predict`` and ``moetool eval`` run) and the exported native one, both in this
process (fp32, torch's threads); vLLM runs the exported one in its own environment (fp32, eager,
one process; see scripts/vllm_lane.py). Goal: vLLM >= 3x transformers at batch 16.

    python benchmarks/serve.py [--venv .venv-vllm] [--hidden 256 --layers 4 --experts 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from vllm_lane import DEFAULT_VENV, ensure_venv, generate, upcycled_checkpoint  # noqa: E402

BATCHES = (1, 16)


def build(root: Path, hidden: int, layers: int, experts: int) -> tuple[Path, Path]:
    from moetool.export import export_checkpoint

    overrides = [
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={2 * hidden}",
        f"model.num_layers={layers}",
        f"model.num_heads={hidden // 32}",
        f"model.num_kv_heads={max(1, hidden // 128)}",
    ]
    sparse = upcycled_checkpoint(
        root, "qwen2", overrides, 0, num_experts=experts, top_k=2, layers="interval"
    )
    export_checkpoint(sparse, root / "native")
    return sparse, root / "native"


def prompts(root: Path, n: int) -> list[dict]:
    from PIL import Image

    out = []
    for i in range(n):
        path = root / f"image-{i}.png"
        if not path.exists():
            Image.new("RGB", (32 + i, 40), (10 * i % 256, 120, 200)).save(path)
        out.append({"text": f"<image>\nDescribe picture {i}.", "image": str(path)})
    return out


def transformers_tokens_per_s(path: Path, batch: list[dict], max_tokens: int, repeats: int):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import moetool  # noqa: F401

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(
        images=[Image.open(p["image"]) for p in batch],
        text=[p["text"] for p in batch],
        return_tensors="pt",
        padding=True,
    )
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    timings = []
    with torch.no_grad():
        model.generate(**inputs, **kwargs)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(**inputs, **kwargs)
            timings.append(time.perf_counter() - started)
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch)
    return generated / min(timings), min(timings)


def measure(root: Path, python: Path, args) -> dict:
    sparse, native = build(root, args.hidden, args.layers, args.experts)
    jobs = [
        {
            "name": f"batch-{n}",
            "path": str(native),
            "prompts": prompts(root, n),
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "repeats": args.repeats + 1,  # the first is the warm-up
        }
        for n in BATCHES
    ]
    served = generate(python, jobs)
    results = {}
    for n, job in zip(BATCHES, jobs, strict=True):
        vllm_s = min(served[job["name"]]["generate_seconds"][1:])
        generated = sum(len(p["tokens"]) for p in served[job["name"]]["prompts"])
        row = {"vllm_tokens_per_s": generated / vllm_s}
        for label, path in (("moetool", sparse), ("native", native)):
            rate, _ = transformers_tokens_per_s(path, job["prompts"], args.max_tokens, args.repeats)
            row[f"transformers_{label}_tokens_per_s"] = rate
        row["vllm_over_transformers_moetool"] = (
            row["vllm_tokens_per_s"] / row["transformers_moetool_tokens_per_s"]
        )
        results[f"batch {n}"] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM's environment")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from moetool.cli.render import stdout_to_stderr

    python = ensure_venv(args.venv.resolve())
    root = Path(tempfile.mkdtemp(prefix="moetool-serve-bench-"))
    try:
        with stdout_to_stderr():  # libraries' prints (DeepSpeed's, on save) stay out of the JSON
            results = measure(root, python, args)
        print(
            json.dumps(
                {
                    "setting": {
                        "hidden": args.hidden,
                        "layers": args.layers,
                        "experts": args.experts,
                        "top_k": 2,
                        "moe_layers": "interval",
                        "max_tokens": args.max_tokens,
                        "dtype": "float32",
                    },
                    "results": results,
                    "goal": "vllm_over_transformers_moetool >= 3 at batch 16",
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
