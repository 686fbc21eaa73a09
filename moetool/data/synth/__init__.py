"""Synthetic data: coloured shapes on plain backgrounds, small enough to train a VLM on CPU.

Each image is one background colour with 1..``max_objects`` shapes, each shape alone inside its
own quadrant, so colour, shape, count and position stay readable after downscaling to 32x32.
The same scenes give the LLaVA-JSON files of the three training stages and, from held-out images
only, POPE, GQA, VQAv2 and MMBench style evaluation sets.

The package: ``scenes`` (the world, its config and pixels), ``questions`` (captions, prompts,
questions and answer balancing), ``training`` (the stages' LLaVA-JSON files), ``evalsets`` (the
evaluation sets); ``generate`` writes them all. ``moetool.eval.datasets`` converts the evaluation
sets into the schemas of the hub datasets lmms-eval reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from moetool.data.synth.evalsets import gqa_set, mmbench_set, pope_set, vqav2_set
from moetool.data.synth.questions import (
    BRIEF_PROMPTS,
    DETAILED_PROMPTS,
    QUESTION_TEMPLATES,
    article,
)
from moetool.data.synth.scenes import (
    LETTER_ANSWER,
    PALETTE,
    POSITIONS,
    SHAPES,
    SHORT_ANSWER,
    SynthConfig,
    draw_scene,
    rng_for,
    sample_scenes,
    scene_annotation,
)
from moetool.data.synth.training import caption_samples, instruction_samples
from moetool.io import atomic_output_dir

__all__ = [
    "BRIEF_PROMPTS",
    "DETAILED_PROMPTS",
    "LETTER_ANSWER",
    "PALETTE",
    "POSITIONS",
    "QUESTION_TEMPLATES",
    "SHAPES",
    "SHORT_ANSWER",
    "SynthConfig",
    "article",
    "generate",
]


def generate(
    out: str | Path,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    also: Callable[[Path, Path], dict[str, int]] | None = None,
) -> dict[str, int]:
    """Write the synthetic dataset into ``out`` and return the number of records per file.

    ``out`` must not exist unless ``overwrite`` (``FileExistsError``); everything is written to
    a temporary sibling that is renamed to ``out`` only when complete — including what
    ``also(tmp, out)`` writes into it (files derived from the world; paths it records should name
    ``out``); its counts join the result. The same config gives byte-identical files.
    """
    config = config or SynthConfig()
    stage_sizes = {"stage1": config.stage1, "stage2": config.stage2, "stage3": config.stage3}
    # Each training image serves about four samples across the three stages.
    train_images = math.ceil(sum(stage_sizes.values()) / 4)

    eval_scenes = sample_scenes(config, "eval", config.eval_images, rng_for(config, "eval"), set())
    held_out = {s.signature() for s in eval_scenes}
    train_scenes = sample_scenes(config, "train", train_images, rng_for(config, "train"), held_out)

    files: dict[str, list] = {
        "annotations.json": [scene_annotation(s) for s in train_scenes + eval_scenes],
        "stage1.json": caption_samples(train_scenes, config.stage1, 0, rng_for(config, "stage1")),
    }
    offset = config.stage1
    for stage, multi_turn in zip(("stage2", "stage3"), config.multi_turn, strict=True):
        files[f"{stage}.json"] = instruction_samples(
            stage, train_scenes, stage_sizes[stage], offset, config.mix(stage), multi_turn, config
        )
        offset += stage_sizes[stage]
    all_scenes = train_scenes + eval_scenes
    for category in ("random", "popular", "adversarial"):
        files[f"eval/pope_{category}.json"] = pope_set(eval_scenes, all_scenes, category, config)
    files["eval/gqa.json"] = gqa_set(eval_scenes, config)
    files["eval/vqav2.json"] = vqav2_set(eval_scenes, config)
    files["eval/mmbench.json"] = mmbench_set(eval_scenes, config)

    with atomic_output_dir(out, overwrite) as tmp:
        for split in ("train", "eval"):
            (tmp / "images" / split).mkdir(parents=True)
        for scene in all_scenes:
            draw_scene(scene, config.image_size).save(
                tmp / scene.image, format="PNG", compress_level=6
            )
        for name, records in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(records, sort_keys=True, indent=1, ensure_ascii=False)
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        derived = also(tmp, Path(out)) if also is not None else {}

    summary = {"images/train": len(train_scenes), "images/eval": len(eval_scenes)}
    return summary | {name: len(records) for name, records in files.items()} | derived
