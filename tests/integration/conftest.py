import json
import random
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


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with tiny data, a copy of the tiny llama recipe, and it as the cwd."""
    write_colour_data(tmp_path)
    text = (
        (recipes_root() / "tiny/llama.toml")
        .read_text()
        .replace('extends = "_base.toml"', f'extends = "{recipes_root() / "tiny/_base.toml"}"')
    )
    (tmp_path / "recipe.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def colour_world():
    """``write_colour_data``, for fixtures wider than one test (a shared dense run)."""
    return write_colour_data
