"""`moetool routing capture | stats | plot` through the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "moetool"


def run(*args):
    env = dict(os.environ, COLUMNS="150")
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.integration
def test_capture_stats_plot(tmp_path):
    from moetool.models.build import save_checkpoint
    from moetool.models.moe.config import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    assert (
        run(
            "data",
            "synth",
            str(tmp_path / "data"),
            "--stage1",
            "8",
            "--stage2",
            "8",
            "--stage3",
            "8",
            "--eval-images",
            "4",
            "--image-size",
            "32",
        ).returncode
        == 0
    )
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/qwen2.toml"))
    save_checkpoint(model, processor, tmp_path / "dense")
    upcycle_checkpoint(
        tmp_path / "dense",
        tmp_path / "moe",
        MoEConfig(num_experts=8, layers=(1, 3), router_std=1.0),
    )
    args = [
        "--data",
        str(tmp_path / "data/stage3.json"),
        "--image-folder",
        str(tmp_path / "data"),
        "--template",
        "qwen",
        "--limit",
        "6",
    ]
    proc = run(
        "routing",
        "capture",
        "--model",
        str(tmp_path / "moe"),
        *args,
        "--out",
        str(tmp_path / "cap"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(run("routing", "stats", str(tmp_path / "cap"), "--json").stdout)
    assert stats["layers"] == [1, 3] and stats["num_experts"] == 8
    for layer, loads in stats["load_top1"].items():
        assert sum(loads) == pytest.approx(1.0), layer
    assert len(stats["top_pathways"]["image"]) >= 1
    plotted = run("routing", "plot", str(tmp_path / "cap"))
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (tmp_path / "cap/figures/expert_load.png").exists()
    dense = run(
        "routing",
        "capture",
        "--model",
        str(tmp_path / "dense"),
        *args,
        "--out",
        str(tmp_path / "cap2"),
    )
    assert dense.returncode == 2 and "no MoE layers" in dense.stderr
    assert not (tmp_path / "cap2").exists()
    # The same model over an evaluation task's local data, asked as `moetool eval` asks.
    proc = run(
        "routing",
        "capture",
        "--model",
        str(tmp_path / "moe"),
        "--task",
        "pope_random",
        "--data",
        str(tmp_path / "data/lmms"),
        "--limit",
        "5",
        "--out",
        str(tmp_path / "cap3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from moetool.routing.capture import RoutingCapture

    records = RoutingCapture.load(tmp_path / "cap3").records
    assert records["sample"].nunique() == 5
    image = records[(records["modality"] == "image") & (records["rank"] == 0)]
    config = json.loads((tmp_path / "moe/config.json").read_text())
    # every sample's image tokens, in every MoE layer
    assert (image.groupby(["sample", "layer"]).size() == config["image_seq_length"]).all()
    assert len(image.groupby(["sample", "layer"])) == 5 * 2
    unknown = run(
        "routing",
        "capture",
        "--model",
        str(tmp_path / "moe"),
        "--task",
        "nope",
        "--data",
        str(tmp_path / "data/lmms"),
        "--out",
        str(tmp_path / "cap4"),
    )
    assert unknown.returncode == 2 and "unknown task 'nope'" in unknown.stderr
