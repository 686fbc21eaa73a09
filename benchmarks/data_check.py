"""Throughput of ``moetool data check`` (``moetool.data.check.check_stage``) with 1 and 2
worker processes, on two synthetic sets. Prints JSON.

- ``json_tokens``: a LLaVA-mix665k-like JSON set (``--samples``, default 665,000) checked for
  structure, turn order and token lengths in the Vicuna-style template at max_length 2048 with
  CLIP-L/336's 576 image tokens (the training encoder, ``Preprocessor.tokenize``/``truncate``).
  The mix follows LLaVA-1.5's Table 7 by source, with turn counts and lengths in words close to
  each source's: LLaVA-Instruct 158k (1-4 rounds, long answers), ShareGPT 40k (text-only, long),
  short-answer VQA 332k (VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA: 1-8 rounds of "Answer the
  question using a single word or phrase."), TextCaps 22k, RefCOCO + VG 134k (region boxes and
  descriptions). Its images point at a pool of 64 small JPEGs, so this phase measures the text.
- ``decode``: ``--images`` (default 300) distinct 640x480 JPEGs (noise over gradients, quality
  90, about LLaVA's COCO sizes), each decoded fully; images/s.

The tokenizer is moetool's offline BPE (``tiny.build_tokenizer``, 4,096 tokens): a real base's
tokenizer (32k-100k tokens) costs about the same per character.

    python benchmarks/data_check.py [--samples 665000 --images 300 --workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "on",
    "with",
    "for",
    "that",
    "this",
    "it",
    "at",
    "as",
    "by",
    "from",
    "image",
    "picture",
    "shows",
    "man",
    "woman",
    "person",
    "people",
    "red",
    "green",
    "blue",
    "white",
    "black",
    "small",
    "large",
    "left",
    "right",
    "near",
    "far",
    "behind",
    "front",
    "top",
    "bottom",
    "table",
    "chair",
    "street",
    "car",
    "bus",
    "tree",
    "sky",
    "water",
    "dog",
    "cat",
    "bird",
    "sign",
    "building",
    "window",
    "door",
    "road",
    "grass",
    "field",
    "plate",
    "food",
    "pizza",
    "kitchen",
    "room",
    "wall",
    "light",
    "shadow",
    "background",
    "what",
    "where",
    "how",
    "many",
    "which",
    "colour",
    "color",
    "there",
    "are",
    "wearing",
    "holding",
    "sitting",
    "standing",
    "looking",
]
SHORT = "Answer the question using a single word or phrase."
IMAGE_TOKENS = 576  # CLIP-L/336: (336 / 14) ** 2
MAX_LENGTH = 2048
# (source, samples of 665k, has image, rounds, question words, answer words)
MIX = (
    ("llava_instruct", 158_000, True, (1, 4), (8, 25), (20, 120)),
    ("sharegpt", 40_000, False, (1, 4), (10, 120), (50, 250)),
    ("vqa_short", 332_000, True, (1, 8), (5, 15), (1, 3)),
    ("textcaps", 22_000, True, (1, 1), (6, 10), (8, 20)),
    ("ref_vg", 113_000, True, (2, 8), (8, 14), (4, 10)),
)


def words(rng: random.Random, span: tuple[int, int]) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(*span)))


def mix_samples(count: int, images: list[str], seed: int = 0) -> list[dict]:
    """``count`` samples in LLaVA-mix665k's proportions by source (see the module doc)."""
    rng = random.Random(seed)
    total = sum(m[1] for m in MIX)
    sizes = [count * m[1] // total for m in MIX]
    sizes[2] += count - sum(sizes)  # the remainder to the largest source
    rows = []
    for (source, _, has_image, rounds, q_words, a_words), size in zip(MIX, sizes, strict=True):
        for i in range(size):
            conversation = []
            for r in range(rng.randint(*rounds)):
                question = words(rng, q_words) + "?"
                if source == "vqa_short":
                    question += "\n" + SHORT
                if r == 0 and has_image:
                    question = "<image>\n" + question
                conversation += [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": words(rng, a_words) + "."},
                ]
            row = {"id": f"{source}_{i}", "conversations": conversation}
            if has_image:
                row["image"] = images[i % len(images)]
            rows.append(row)
    rng.shuffle(rows)
    return rows


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    names = []
    for i in range(count):
        base = np.stack([(x * (i + 1)) % 256, (y * 3 + i) % 256, (x + y) % 256], axis=-1)
        pixels = np.clip(base + noise.normal(0, 24, base.shape), 0, 255).astype("uint8")
        name = f"{folder.name}/{i:06d}.jpg"
        Image.fromarray(pixels).save(folder.parent / name, quality=90)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=665_000, help="JSON set size")
    parser.add_argument("--images", type=int, default=300, help="640x480 JPEGs to decode")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from moetool.data.check import check_stage
    from moetool.data.preprocess import Preprocessor
    from moetool.data.templates import get_template
    from moetool.models.build import llava_processor
    from moetool.tiny import build_tokenizer

    tokenizer = build_tokenizer(32000, "stablelm")
    processor = llava_processor("clip", 336, 14, tokenizer)
    pre = Preprocessor(processor, get_template("stablelm"), IMAGE_TOKENS, MAX_LENGTH, "pad")
    work = Path(tempfile.mkdtemp(prefix="moetool-data-check-bench-", dir=args.workdir))
    try:
        pool = write_jpegs(work / "pool", 64, (64, 48))
        mix = work / "mix.json"
        mix.write_text(json.dumps(mix_samples(args.samples, pool)))
        names = write_jpegs(work / "jpeg", args.images, (640, 480), seed=1)
        qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}]
        photos = work / "photos.json"
        photos.write_text(json.dumps([{"id": n, "image": n, "conversations": qa} for n in names]))
        results = {}
        setting = {
            "cpu_count": os.cpu_count(),
            "json_mb": round(mix.stat().st_size / 2**20, 1),
            "jpeg_kb_mean": round(
                sum((work / n).stat().st_size for n in names) / max(1, len(names)) / 1024, 1
            ),
        }
        for workers in args.workers:
            start = time.perf_counter()
            text = check_stage("json_tokens", [mix], work, pre, workers=workers)
            wall = time.perf_counter() - start
            decode = check_stage("decode", [photos], work, pre, workers=workers)
            assert text.bad == 0 and decode.bad == 0, (text.problems[:3], decode.problems[:3])
            results[f"workers={workers}"] = {
                "json_tokens_samples_per_s": round(text.samples / text.seconds["samples"], 1),
                "json_tokens_samples_per_s_with_read": round(text.samples / wall, 1),
                "json_tokens_seconds": {**text.seconds, "wall": round(wall, 3)},
                "decode_images_per_s": round(decode.images / decode.seconds["images"], 1),
                "decode_seconds": decode.seconds,
            }
            setting["samples"] = text.samples
            setting["images"] = decode.images
            setting["tokens"] = text.tokens
            setting["truncated"] = text.counts("warning").get("truncated", 0)
            setting["text_only"] = text.text_only
        print(json.dumps({"setting": setting, "results": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
