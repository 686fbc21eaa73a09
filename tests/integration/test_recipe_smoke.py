"""Every bundled recipe, in smoke form (tiny dims, two steps per stage, synthetic data), runs
all its stages on DeepSpeed: its stage logic, schedules, ZeRO settings and MoE layout."""

import json
import subprocess
import sys

import pytest

from moetool.quickstart import whole_vlm_quickstart
from moetool.recipe import load_recipe
from moetool.recipe.paths import bundled_recipes, recipes_root

pytestmark = pytest.mark.integration

DRIVER = """
import json, sys
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import smoke_recipe
from moetool.train.runner import run_stage

data_root, run_root = sys.argv[1], sys.argv[2]
report = {}
for name in sys.argv[3:]:
    recipe = smoke_recipe(load_recipe(recipes_root() / f"{name}.toml"), data_root)
    report[name] = {}
    for stage in recipe.stages.present():
        result = run_stage(recipe, stage, f"{run_root}/{name}")
        report[name][stage] = [result.steps, result.loss_first, result.loss_last]
print("REPORT " + json.dumps(report))
"""


def test_every_bundled_recipe_runs_in_smoke_form(tmp_path):
    from moetool.data.synth import SynthConfig, generate

    generate(
        tmp_path / "data",
        SynthConfig(image_size=32, stage1=16, stage2=16, stage3=16, eval_images=4),
    )
    # A whole-VLM quickstart's recipe starts from the tiny base the quickstart builds; the
    # quickstart's own test runs it (tests/integration/test_quickstart.py).
    names = [n for n in bundled_recipes() if whole_vlm_quickstart(n) is None]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "data"), str(tmp_path / "runs"), *names],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert set(report) == set(names)
    for name in names:
        recipe = load_recipe(recipes_root() / f"{name}.toml")
        assert list(report[name]) == list(recipe.stages.present()), name
        for stage, (steps, first, last) in report[name].items():
            assert steps == 2 and first == first and last == last, (name, stage)  # finite
            assert (tmp_path / "runs" / name / stage / "config.json").exists()
        if recipe.moe is not None:
            config = json.loads((tmp_path / "runs" / name / "moe_tune/config.json").read_text())
            assert config["moe"]["num_experts"] == recipe.moe.num_experts
            assert config["moe"]["top_k"] == recipe.moe.top_k
