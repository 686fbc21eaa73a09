"""Served = trained: every stage checkpoint carries the image processor its samples went
through, so a plain AutoProcessor of it gives the training pipeline's pixels (issue 23)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration
SCRIPT = str(Path(sys.executable).parent / "moetool")
SIZES = [(96, 64), (50, 120)]


def test_stage_checkpoints_carry_the_training_image_processor(workdir):
    from transformers import AutoProcessor

    from moetool.data.llava_json import load_llava_json
    from moetool.data.preprocess import Preprocessor, expand_to_square
    from moetool.data.templates import get_template
    from moetool.recipe import load_recipe
    from moetool.tiny import build_random_lvlm

    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(SIZES):  # non-square images among the training data
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(workdir / f"data/img/{i}.png")
    sets = [
        "--set",
        "stages.pretrain.max_steps=1",
        "--set",
        "stages.instruct.max_steps=1",
        "--set",
        "stages.pretrain.image_aspect_ratio=resize",
        "--set",
        "stages.instruct.image_aspect_ratio=pad",
    ]
    env = dict(os.environ, COLUMNS="120")
    for stage, init in (("pretrain", []), ("instruct", ["--init", "run/pretrain"])):
        proc = subprocess.run(
            [SCRIPT, stage, "recipe.toml", "--out", "run", *init, *sets],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = load_recipe("recipe.toml", [s for s in sets if s != "--set"])
    pretrain = AutoProcessor.from_pretrained(workdir / "run/pretrain")
    for stage in ("pretrain", "instruct"):
        section = getattr(recipe.stages, stage)
        # The training pipeline of the stage, from the processor the stage starts with.
        start = pretrain if stage == "instruct" else build_random_lvlm(recipe)[1]
        template = get_template(section.template or recipe.data.template)
        pre = Preprocessor(
            start,
            template,
            recipe.vision.image_tokens,
            section.max_length,
            section.image_aspect_ratio,
        )
        samples, _ = load_llava_json(
            [workdir / "data" / f for f in section.data], workdir / "data", False
        )
        saved = AutoProcessor.from_pretrained(workdir / "run" / stage).image_processor
        config = json.loads((workdir / "run" / stage / "config.json").read_text())
        assert config["moetool"]["stage"] == stage
        for sample in samples[: len(SIZES)]:
            image = Image.open(sample.images[0]).convert("RGB")
            trained = pre.encode(sample)["pixel_values"]
            assert torch.equal(saved(image, return_tensors="pt")["pixel_values"], trained)
            fill = tuple(int(255 * m) for m in saved.image_mean)
            padded = saved(expand_to_square(image, fill), return_tensors="pt")["pixel_values"]
            # pad: the padded image; resize: not (these images are not square).
            assert torch.equal(trained, padded) == (section.image_aspect_ratio == "pad")
