"""Share of training-step time spent waiting for data, with ``data.num_workers`` 0, 1 and 2, in
one run. Prints JSON.

The data is what a real stage II reads: LLaVA-JSON samples with 640x480 JPEGs and conversations
that fill ``max_length`` = 2048 tokens with the image's 576 (CLIP-L/336: 24 x 24 patches),
through moetool's own pipeline (``load_llava_json``, ``Preprocessor`` with the CLIP-L/336 image
processor settings, ``EncodedDataset``, ``StageBatchSampler``, ``make_loader``). The training
step is fixed compute: matrix products sized so one step takes ``--step-seconds`` on this machine
(calibrated first), standing in for a model's forward and backward. Per setting: the mean step
time, the time spent in ``next(loader)``, and their ratio. Goal: <= 5% with workers.

On a GPU machine the step runs on the GPU and the CPU is free for the workers; here the compute
and the workers share the same cores, which the step time over the pure compute shows.

    python benchmarks/data_pipeline.py [--batch 4 --steps 20 --step-seconds 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "round",
    "square",
    "image",
    "shows",
    "picture",
    "left",
    "right",
    "near",
    "far",
    "object",
    "person",
    "table",
    "chair",
    "window",
    "light",
    "shadow",
    "colour",
    "texture",
    "background",
    "foreground",
    "street",
    "tree",
    "sky",
    "cloud",
    "water",
    "stone",
    "wall",
    "door",
    "car",
    "bicycle",
    "dog",
    "cat",
    "bird",
    "flower",
    "grass",
    "road",
    "sign",
]
IMAGE_TOKENS = 576  # CLIP-L/336: (336 / 14) ** 2
MAX_LENGTH = 2048


def write_data(root: Path, samples: int, tokenizer, seed: int = 0) -> Path:
    """``samples`` 640x480 JPEGs and one LLaVA-JSON file of long conversations about them."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    y, x = np.mgrid[0:480, 0:640]
    budget = MAX_LENGTH - IMAGE_TOKENS - 64  # the template's own tokens fit in the rest
    rows = []
    for i in range(samples):
        base = np.stack([(x * (i + 1)) % 256, (y * 3 + i) % 256, (x + y) % 256], axis=-1)
        pixels = np.clip(base + noise.normal(0, 24, base.shape), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(root / f"img/{i}.jpg", quality=90)
        turns, used = [], 0
        while True:
            question = " ".join(rng.choices(WORDS, k=rng.randint(8, 20))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(60, 160))) + "."
            cost = len(tokenizer(question + " " + answer)["input_ids"]) + 8
            if used + cost > budget:
                break
            turns.append((question, answer))
            used += cost
        conversation = []
        for n, (question, answer) in enumerate(turns):
            conversation.append(
                {"from": "human", "value": ("<image>\n" if n == 0 else "") + question}
            )
            conversation.append({"from": "gpt", "value": answer})
        rows.append({"id": f"s{i}", "image": f"img/{i}.jpg", "conversations": conversation})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def calibrated_step(seconds: float):
    """A function of the batch that takes about ``seconds`` of matrix products."""
    import torch

    a = torch.randn(512, 512)

    def work(repeats: int, batch=None) -> float:
        out = a
        for _ in range(repeats):
            out = torch.tanh(out @ a)
        return float(out[0, 0]) + (0.0 if batch is None else float(batch["input_ids"][0, 0]))

    work(5)
    start = time.perf_counter()
    work(50)
    per_repeat = (time.perf_counter() - start) / 50
    repeats = max(1, round(seconds / per_repeat))
    return lambda batch: work(repeats, batch)


def measure(loader, step, steps: int) -> dict:
    """Mean step time and data wait over ``steps`` steps, after one warm-up step (the workers'
    start)."""
    batches = iter(loader)
    batch, _ = next(batches)
    step(batch)
    waits, totals = [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch, bad = next(batches)
        got = time.perf_counter()
        assert batch is not None and not bad
        step(batch)
        waits.append(got - start)
        totals.append(time.perf_counter() - start)
    return {
        "step_seconds_mean": statistics.fmean(totals),
        "data_wait_seconds_mean": statistics.fmean(waits),
        "data_wait_share": sum(waits) / sum(totals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (samples per step)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from moetool.data.llava_json import load_llava_json
    from moetool.data.pipeline import EncodedDataset, StageBatchSampler, make_loader
    from moetool.data.preprocess import Preprocessor
    from moetool.data.templates import get_template
    from moetool.models.build import llava_processor
    from moetool.tiny import build_tokenizer

    tokenizer = build_tokenizer(32000, "stablelm")
    processor = llava_processor("clip", 336, 14, tokenizer)  # CLIP-L/336's image processor
    preprocessor = Preprocessor(
        processor, get_template("stablelm"), IMAGE_TOKENS, MAX_LENGTH, "pad"
    )
    samples_needed = args.batch * (args.steps + 1)
    work = Path(tempfile.mkdtemp(prefix="moetool-data-bench-", dir=args.workdir))
    try:
        data = write_data(work, samples_needed, tokenizer)
        samples, _ = load_llava_json([data], work)
        lengths = [len(preprocessor.encode(s)["input_ids"]) for s in samples[:4]]
        step = calibrated_step(args.step_seconds)
        compute = [time.perf_counter()]
        for _ in range(3):
            step(None)
            compute.append(time.perf_counter())
        compute_s = min(b - a for a, b in zip(compute, compute[1:], strict=False))
        results = {}
        for workers in args.workers:
            sampler = StageBatchSampler(samples, args.batch, 0, 1, seed=0)
            loader = make_loader(
                EncodedDataset(samples, preprocessor), sampler, tokenizer.pad_token_id, workers
            )
            row = measure(loader, step, args.steps)
            row["step_over_compute"] = row["step_seconds_mean"] / compute_s
            results[f"num_workers={workers}"] = row
            del loader
        print(
            json.dumps(
                {
                    "setting": {
                        "micro_batch": args.batch,
                        "steps": args.steps,
                        "image": "640x480 JPEG -> CLIP-L/336 (pad)",
                        "tokens_per_sample": lengths,
                        "compute_seconds_per_step": compute_s,
                        "cpu_count": os.cpu_count(),
                    },
                    "results": results,
                    "goal": "data_wait_share <= 0.05 with workers",
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
