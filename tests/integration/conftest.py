import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moetool.recipe.paths import recipes_root

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 30),
}


def write_colour_data(root: Path, n: int = 48, seed: int = 0) -> None:
    """A minimal colour world: each image is one colour; captions and questions about it."""
    rng = random.Random(seed)
    (root / "data/img").mkdir(parents=True)
    captions, questions = [], []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        Image.new("RGB", (32, 32), COLOURS[colour]).save(root / f"data/img/{i}.png")
        captions.append(
            {
                "id": f"c{i}",
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"a {colour} picture"},
                ],
            }
        )
        questions.append(
            {
                "id": f"q{i}",
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the image?"},
                    {"from": "gpt", "value": colour.capitalize() + "."},
                ],
            }
        )
    (root / "data/stage1.json").write_text(json.dumps(captions))
    (root / "data/stage2.json").write_text(json.dumps(questions))
    (root / "data/stage3.json").write_text(json.dumps(questions))


def write_tiny_llama_world(root: Path) -> None:
    """The colour world and a copy of the tiny llama recipe in ``root``."""
    write_colour_data(root)
    text = (
        (recipes_root() / "tiny/llama.toml")
        .read_text()
        .replace('extends = "_base.toml"', f'extends = "{recipes_root() / "tiny/_base.toml"}"')
    )
    (root / "recipe.toml").write_text(text)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with tiny data, a copy of the tiny llama recipe, and it as the cwd."""
    write_tiny_llama_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def stage_one_checkpoint(tmp_path_factory) -> Path:
    """One stage-I run (one step) of the tiny llama recipe on the colour world, made once per
    session through the real CLI: the start of every test that only needs some stage-I
    checkpoint to run stage II or III from."""
    root = tmp_path_factory.mktemp("stage-one")
    write_tiny_llama_world(root)
    moetool = str(Path(sys.executable).parent / "moetool")
    argv = [moetool, "pretrain", "recipe.toml", "--out", "run"]
    argv += ["--set", "stages.pretrain.max_steps=1"]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, COLUMNS="120"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run/pretrain"


@pytest.fixture
def pretrained(workdir, stage_one_checkpoint):
    """``workdir`` with a stage-I checkpoint in run/pretrain (a copy of the session's), as
    ``moetool pretrain recipe.toml --out run --set stages.pretrain.max_steps=1`` leaves it."""
    shutil.copytree(stage_one_checkpoint, workdir / "run/pretrain")
    return workdir


@pytest.fixture(scope="session")
def colour_world():
    """``write_colour_data``, for fixtures wider than one test (a shared dense run)."""
    return write_colour_data
