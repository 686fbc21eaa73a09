"""The quickstart's own pieces (the whole run is in tests/integration/test_quickstart.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from moetool.data.synth import SynthConfig, generate
from moetool.quickstart import BLANK_RGB, SYNTH, blank_copy, pope_summary


def test_the_blind_copy_keeps_every_question_and_blanks_every_image(tmp_path):
    generate(
        tmp_path / "data", SynthConfig(image_size=32, stage1=4, stage2=4, stage3=4, eval_images=6)
    )
    blank_copy(tmp_path / "data", tmp_path / "blind")
    for path in (tmp_path / "data" / "eval").glob("*.json"):
        assert (tmp_path / "blind" / "eval" / path.name).read_text() == path.read_text()
    originals = sorted((tmp_path / "data" / "images" / "eval").glob("*.png"))
    assert originals
    for path in originals:
        blank = np.asarray(Image.open(tmp_path / "blind" / "images" / "eval" / path.name))
        assert blank.shape == np.asarray(Image.open(path)).shape
        assert (blank == np.array(BLANK_RGB, dtype=np.uint8)).all()


def test_the_blank_colour_is_no_colour_of_the_world():
    from moetool.data.synth import PALETTE

    assert BLANK_RGB not in PALETTE.values()
    assert set(SYNTH.colours) <= set(PALETTE)


def test_pope_summary_averages_the_three_splits():
    metrics = {
        "pope_adv": {"pope_accuracy": 0.7, "pope_f1_score": 0.6, "yes_ratio_predicted": 0.4},
        "pope_pop": {"pope_accuracy": 0.8, "pope_f1_score": 0.8, "yes_ratio_predicted": 0.5},
        "pope_random": {"pope_accuracy": 0.9, "pope_f1_score": 1.0, "yes_ratio_predicted": 0.6},
    }
    summary = pope_summary(metrics)
    assert summary["accuracy"] == pytest.approx(0.8)
    assert summary["f1"] == pytest.approx(0.8)
    assert summary["yes_ratio"] == pytest.approx(0.5)
    assert json.loads(json.dumps(summary))["splits"] == metrics


def test_the_whole_vlm_quickstart_recipe_describes_the_base_it_builds(tmp_path):
    """``recipes/tiny/quickstart-qwen3-vl.config.json`` (the recipe's ``model.config``: its dims,
    its parameter counts) is the config of the tiny base ``quickstart --base qwen3-vl`` builds."""
    import json

    from moetool.quickstart import get_quickstart_base, load_quickstart_recipe, tiny_base
    from moetool.recipe.paths import recipes_root

    base = get_quickstart_base("qwen3-vl")
    model, _ = tiny_base(base)
    model.config.save_pretrained(tmp_path)
    built = json.loads((tmp_path / "config.json").read_text())
    stored = json.loads((recipes_root() / "tiny/quickstart-qwen3-vl.config.json").read_text())
    for config in (built, stored):
        config.pop("transformers_version")
    assert built == stored
    recipe = load_quickstart_recipe(base)
    assert recipe.model.base == "qwen3_vl"
    assert recipe.model.hidden_size == built["text_config"]["hidden_size"]
