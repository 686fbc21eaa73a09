"""Stage III with LoRA (and QLoRA) through the real CLI on DeepSpeed (CPU): it learns, saves a
merged checkpoint equal to the adapter model, resumes bit-equal, runs on ZeRO-3, exports."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
SCRIPT = str(Path(sys.executable).parent / "moetool")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
LORA = [
    "--set",
    'stages.moe_tune.trainable=["routers"]',
    "--set",
    'lora.targets=["ffn"]',
    "--set",
    "lora.r=8",
    "--set",
    "lora.alpha=16",
    "--set",
    "stages.moe_tune.lr=5e-3",
    "--set",
    "stages.moe_tune.max_steps=8",
]


def cli(*args, check=True, cwd=None):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def losses(run: Path) -> list[float]:
    rows = (run / "moe_tune-state/metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, stage_one_checkpoint):
    """The colour world, the tiny llama recipe, its stage I (the session's) and stage II: the
    dense start."""
    root = tmp_path_factory.mktemp("lora") / "world"
    world = stage_one_checkpoint.parents[1]
    shutil.copytree(world, root, ignore=shutil.ignore_patterns("pretrain-state"))
    cli("instruct", "recipe.toml", "--out", "run", cwd=root)
    return root


@pytest.fixture
def workdir(dense_run, monkeypatch):
    monkeypatch.chdir(dense_run)
    return dense_run


def test_lora_stage_learns_and_its_merged_checkpoint_is_the_adapter_model(workdir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401  (the sparse model type)
    from moetool.models.lora import expert_adapters

    cli("moe-tune", "recipe.toml", "--out", "r1", "--init", "run/instruct", *LORA,
        "--set", 'lora.save="both"')  # fmt: skip
    run = workdir / "r1"
    curve = losses(run)
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.2, curve  # it learns
    base = run / "moe_tune-state/upcycled"  # the sparse start: the adapter's named base
    adapter_config = json.loads((run / "moe_tune-adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    merged = weights(run / "moe_tune")
    assert set(merged) == set(weights(base))  # an ordinary sparse checkpoint
    config = json.loads((run / "moe_tune/config.json").read_text())
    assert config["model_type"] == "moetool_llava" and "quantization_config" not in config

    plain = AutoModelForImageTextToText.from_pretrained(run / "moe_tune").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base), run / "moe_tune-adapter"
    ).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 500, (2, 24), generator=g)
    ids[:, 1 : 1 + plain.config.image_seq_length] = plain.config.image_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected = adapted(input_ids=ids, pixel_values=pixels).logits
        got = plain(input_ids=ids, pixel_values=pixels).logits
    assert (got - expected).abs().max() <= 1e-4
    # The experts' adapters diverged: B starts at zero in every expert, and each expert's
    # delta (B A) differs from every other's after training (expert_init = "independent").
    for experts in expert_adapters(adapted):
        deltas = [e["down_proj"].get_delta_weight("default") for e in experts]
        assert all(d.abs().max() > 0 for d in deltas)
        for i in range(len(deltas)):
            for j in range(i + 1, len(deltas)):
                assert not torch.allclose(deltas[i], deltas[j], atol=1e-6)

    # The merged checkpoint exports to the native MoE twin, which loads without moetool.
    cli("export", "r1/moe_tune", "r1/native")
    torch.save({"input_ids": ids, "pixel_values": pixels}, run / "inputs.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        "m = AutoModelForImageTextToText.from_pretrained('r1/native').eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(m(**torch.load('r1/inputs.pt')).logits, 'r1/native.pt')\n"
        "assert not any(n.startswith('moetool') for n in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
    assert (torch.load(run / "native.pt") - got).abs().max() <= 1e-4


def test_lora_resume_with_dropout_is_bit_equal(workdir):
    args = ["--set", "stages.moe_tune.save_steps=2", "--set", "lora.dropout=0.1"]
    cli("moe-tune", "recipe.toml", "--out", "r2", "--init", "run/instruct", *LORA, *args)
    overrides = [a for a in [*LORA, *args] if a != "--set"]
    code = (
        "from moetool.recipe import load_recipe\n"
        "from moetool.train.runner import run_stage\n"
        f"r = load_recipe('recipe.toml', {overrides!r})\n"
        "run_stage(r, 'moe_tune', 'r3', init='run/instruct', stop_after=3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    assert not (workdir / "r3/moe_tune").exists()
    cli("moe-tune", "recipe.toml", "--out", "r3", "--init", "run/instruct", *LORA, *args,
        "--resume")  # fmt: skip
    assert losses(workdir / "r3") == losses(workdir / "r2")
    full, resumed = weights(workdir / "r2/moe_tune"), weights(workdir / "r3/moe_tune")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_lora_on_zero3_with_two_ranks(workdir):
    proc = subprocess.run(
        [
            TORCHRUN,
            "--nproc_per_node",
            "2",
            "-m",
            "moetool",
            "moe-tune",
            "recipe.toml",
            "--out",
            "r4",
            "--init",
            "run/instruct",
            *LORA,
            "--set",
            "stages.moe_tune.zero_stage=3",
            "--set",
            "stages.moe_tune.precision=bf16",
            "--set",
            "stages.moe_tune.max_steps=3",
            "--json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="250"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 3
    before = weights(workdir / "r4/moe_tune-state/upcycled")
    after = weights(workdir / "r4/moe_tune")
    assert set(before) == set(after)
    assert all(before[k].shape == after[k].shape for k in before)  # gathered from 2 ranks
    moved = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}
    assert any(".experts." in k for k in moved) and any(".router." in k for k in moved)
    assert all(".mlp." in k for k in moved)  # adapters on the FFNs, routers in full


def test_qlora_nf4_stage_runs_on_the_cpu_backend(workdir):
    pytest.importorskip("bitsandbytes")
    cli("moe-tune", "recipe.toml", "--out", "r5", "--init", "run/instruct", *LORA,
        "--set", 'lora.quantize="nf4"', "--set", "stages.moe_tune.max_steps=4")  # fmt: skip
    curve = losses(workdir / "r5")
    assert len(curve) == 4 and all(c == c for c in curve)
    config = json.loads((workdir / "r5/moe_tune/config.json").read_text())
    assert "quantization_config" not in config  # dequantized: an ordinary checkpoint
    merged = weights(workdir / "r5/moe_tune")
    assert set(merged) == set(weights(workdir / "r5/moe_tune-state/upcycled"))
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.float32}


def test_bad_lora_sections_and_a_missing_bitsandbytes_are_one_error_line(workdir):
    bad = cli("moe-tune", "recipe.toml", "--out", "r6", "--init", "run/instruct",
              "--set", "lora.r=0", "--set", "lora.dropout=2", check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "lora.r: must be a positive integer" in bad.stderr
    assert "lora.dropout: must be in [0, 1)" in bad.stderr
    # A machine without bitsandbytes: refused in one line before anything is written.
    shadow = workdir / "no-bnb"
    shadow.mkdir(exist_ok=True)
    (shadow / "bitsandbytes.py").write_text("raise ImportError('no backend on this machine')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow), COLUMNS="200")
    proc = subprocess.run(
        [SCRIPT, "moe-tune", "recipe.toml", "--out", "r7", "--init", "run/instruct", *LORA,
         "--set", 'lora.quantize="nf4"'],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs bitsandbytes" in errors[0] and "moetool[qlora]" in errors[0]
    assert not (workdir / "r7").exists()
    shutil.rmtree(shadow)
