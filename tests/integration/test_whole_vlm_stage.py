"""MoE-Tuning started from a whole dense VLM (a recipe's ``model.base``), through the real CLI on
DeepSpeed (CPU): upcycled on the fly, trained on data its own processor and chat template encode,
resumed bit-equal, under ZeRO-2 and ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
SCRIPT = str(Path(sys.executable).parent / "moetool")


def cli(*args, check=True):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path) -> dict:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


RECIPE = """
name = "tiny whole {base}"

[model]
base = "{base}"
path = "dense"
config = "dense/config.json"

[moe]
num_experts = 4
top_k = 2
layers = "interval"
router_init = "normal"
router_std = 0.02

[data]
root = "data"
image_folder = "data"
skip_bad_samples = true

[stages.moe_tune]
trainable = ["ffn", "routers"]
data = ["stage3.json"]
lr = 2e-3
warmup_ratio = 0.0
epochs = 2
max_steps = 6
global_batch_size = 4
per_device_batch_size = 2
max_length = 512
precision = "fp32"
zero_stage = {zero}
gradient_checkpointing = false
save_steps = 2
"""


@pytest.fixture
def whole_vlm(tmp_path, monkeypatch, colour_world):
    """A tiny dense VLM of ``base`` saved in ``dense/``, colour data with one unreadable
    image, and a whole-VLM recipe for it, in the cwd."""

    def make(base: str, zero: int):
        from moetool.tiny_vlm import build_random_vlm

        colour_world(tmp_path, n=19)  # and the broken one: 20, every one met in 6 steps
        data = json.loads((tmp_path / "data/stage3.json").read_text())
        (tmp_path / "data/img/broken.png").write_bytes(b"not a png")
        data.insert(5, dict(data[0], id="broken", image="img/broken.png"))
        (tmp_path / "data/stage3.json").write_text(json.dumps(data))
        model, processor = build_random_vlm(base, seed=1)
        model.save_pretrained(tmp_path / "dense")
        processor.save_pretrained(tmp_path / "dense")
        (tmp_path / "recipe.toml").write_text(RECIPE.format(base=base, zero=zero))
        monkeypatch.chdir(tmp_path)
        return tmp_path

    return make


@pytest.mark.parametrize(("base", "zero"), [("qwen3_vl", 2), ("smolvlm", 3)])
def test_moe_tune_from_a_whole_vlm_learns_and_resumes_bit_equal(whole_vlm, base, zero):
    workdir = whole_vlm(base, zero)
    report = json.loads(cli("moe-tune", "recipe.toml", "--out", "run", "--json").stdout)
    assert report["steps"] == 6 and report["loss_last"] < report["loss_first"]
    assert report["skipped"] == {"unreadable image": 1}
    out = workdir / "run/moe_tune"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"moetool_{base}" and config["moe"]["num_experts"] == 4
    # The base's own chat template is kept (no moetool template attached).
    assert (out / "chat_template.jinja").read_text().strip() == (
        (workdir / "dense/chat_template.jinja").read_text().strip()
    )
    full = weights(out)
    upcycled = weights(workdir / "run/moe_tune-state/upcycled")
    moved = changed(upcycled, full)
    assert moved and all(".mlp." in k for k in moved)  # the FFNs (experts) and routers only
    assert any(".router." in k for k in moved) and any(".experts." in k for k in moved)
    rows = (workdir / "run/moe_tune-state/metrics.jsonl").read_text().splitlines()

    code = (
        "from moetool.recipe import load_recipe\n"
        "from moetool.train.runner import run_stage\n"
        "run_stage(load_recipe('recipe.toml'), 'moe_tune', 'run_b', stop_after=3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    assert not (workdir / "run_b/moe_tune").exists()  # interrupted after step 3
    cli("moe-tune", "recipe.toml", "--out", "run_b", "--resume")
    assert not changed(full, weights(workdir / "run_b/moe_tune"))
    resumed = (workdir / "run_b/moe_tune-state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in resumed] == [json.loads(r)["loss"] for r in rows]

    # The trained model answers through the base's own chat template.
    answer = cli("predict", "--model", str(out), "--prompt", "Colour?", "--image", "data/img/0.png")
    assert answer.stdout.strip()


def test_a_whole_vlm_recipe_refuses_packing_and_a_missing_checkpoint(whole_vlm):
    whole_vlm("qwen3_vl", 2)
    packed = cli(
        "moe-tune",
        "recipe.toml",
        "--out",
        "r",
        "--set",
        "stages.moe_tune.packing=true",
        check=False,
    )
    assert packed.returncode == 2 and "Traceback" not in packed.stderr
    assert "stages.moe_tune.packing: packing is for the LLaVA layout" in packed.stderr
    missing = cli(
        "moe-tune", "recipe.toml", "--out", "r", "--set", "model.path=nowhere", check=False
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "model.path: 'nowhere' is not a local checkpoint directory" in missing.stderr
