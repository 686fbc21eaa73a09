"""Every bundled recipe, in smoke form (tiny dims, two steps per stage, synthetic data), runs
all its stages on DeepSpeed: its stage logic, schedules, ZeRO settings and MoE layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.recipe import load_recipe
from moetool.recipe.paths import bundled_recipes, recipes_root

pytestmark = pytest.mark.integration

DRIVER = """
import json, sys
from pathlib import Path
from moetool.recipe import load_recipe
from moetool.recipe.load import recipe_to_dict
from moetool.recipe.paths import recipes_root
from moetool.smoke import smoke_recipe
from moetool.train.runner import run_stage
from moetool.train.start import default_init

data_root, run_root = sys.argv[1], sys.argv[2]
report, done = {}, {}
for name in sys.argv[3:]:
    recipe = smoke_recipe(load_recipe(recipes_root() / f"{name}.toml"), data_root)
    plain = recipe_to_dict(recipe)
    report[name], keys = {}, {}
    for stage in recipe.stages.present():
        # What the stage trains on and from; a stage of another recipe with the same key (the
        # paper's variants share stages I-II) is not trained again: its checkpoint is reused.
        previous = default_init(Path(run_root) / name, stage, recipe)
        key = json.dumps([
            {k: plain[k] for k in ("model", "vision", "projector", "data")},
            plain["stages"][stage],
            plain.get("moe") if stage == "moe_tune" else None,
            plain.get("lora") if recipe.lora_for(stage) else None,
            keys.get(previous.name) if previous else None,
        ], sort_keys=True, default=str)
        keys[stage] = key
        if key not in done:
            init = done[keys[previous.name]][0] if previous else None
            result = run_stage(recipe, stage, f"{run_root}/{name}", init=init)
            losses = [result.loss_first, result.loss_last]
            done[key] = (str(result.checkpoint), [result.steps, *losses])
        report[name][stage] = [done[key][0], *done[key][1]]
print("REPORT " + json.dumps(report))
"""


def test_every_bundled_recipe_runs_in_smoke_form(tmp_path):
    from moetool.data.synth import SynthConfig, generate

    generate(
        tmp_path / "data",
        SynthConfig(image_size=32, stage1=16, stage2=16, stage3=16, eval_images=4),
    )
    names = bundled_recipes()
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
        for stage, (checkpoint, steps, first, last) in report[name].items():
            assert steps == 2 and first == first and last == last, (name, stage)  # finite
            assert (Path(checkpoint) / "config.json").exists()
        if recipe.moe is not None:
            config = json.loads((Path(report[name]["moe_tune"][0]) / "config.json").read_text())
            assert config["moe"]["num_experts"] == recipe.moe.num_experts
            assert config["moe"]["top_k"] == recipe.moe.top_k
