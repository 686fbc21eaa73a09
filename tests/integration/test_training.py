"""The three stages through the real CLI on DeepSpeed (CPU), with a tiny recipe."""

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
STEPS = [
    "--set",
    "stages.pretrain.max_steps=6",
    "--set",
    "stages.instruct.max_steps=6",
    "--set",
    "stages.moe_tune.max_steps=6",
]


TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun(*argv, **env):
    """Two processes under torchrun (gloo); wide enough that error lines do not wrap."""
    return subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="250", **env),
    )


def cli(*args, check=True):
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_three_stages_train_the_right_parameters(workdir, library_chatter):
    from moetool.recipe import load_recipe
    from moetool.tiny import build_random_lvlm

    summaries = {}
    for stage, command in (
        ("pretrain", "pretrain"),
        ("instruct", "instruct"),
        ("moe_tune", "moe-tune"),
    ):
        proc = cli(command, "recipe.toml", "--out", "run", *STEPS, "--json")
        summaries[stage] = json.loads(proc.stdout)
        assert library_chatter(proc.stderr) == [], stage
        assert summaries[stage]["loss_last"] < summaries[stage]["loss_first"], stage

    recipe = load_recipe("recipe.toml")
    initial, _ = build_random_lvlm(recipe, seed=recipe.stages.pretrain.seed)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        initial.save_pretrained(tmp)
        w0 = weights(Path(tmp))
    w1 = weights(workdir / "run/pretrain")
    w2 = weights(workdir / "run/instruct")
    up = weights(workdir / "run/moe_tune-state/upcycled")
    w3 = weights(workdir / "run/moe_tune")

    # Stage I: only the projector trains.
    assert changed(w0, w1) == {k for k in w0 if k.startswith("multi_modal_projector")}
    # Stage II: LLM and projector; the vision tower is frozen.
    c2 = changed(w1, w2)
    assert not any(k.startswith("vision_tower") for k in c2)
    assert any("mlp" in k for k in c2) and any("self_attn" in k for k in c2)
    assert any(k.startswith("multi_modal_projector") for k in c2)
    # Stage III: every layer's FFN (experts and dense FFNs) and the routers; nothing else.
    c3 = changed(up, w3)
    assert c3 and all(".mlp." in k for k in c3)
    assert any(".mlp.router." in k for k in c3) and any(".mlp.experts." in k for k in c3)
    assert any(".layers.1.mlp.gate_proj" in k for k in c3)  # a dense layer between MoE layers
    assert set(w3) == set(up)

    rows = [
        json.loads(x)
        for x in (workdir / "run/moe_tune-state/metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and all(0.99 < r["aux_loss"] < 4.0 for r in rows)
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine decay
    config = json.loads((workdir / "run/moe_tune/config.json").read_text())
    assert config["model_type"] == "moetool_llava" and config["moetool"]["stage"] == "moe_tune"
    tok = json.loads((workdir / "run/moe_tune/tokenizer_config.json").read_text())
    assert (
        "ASSISTANT" in tok.get("chat_template", "")
        or (workdir / "run/moe_tune/chat_template.jinja").exists()
    )


def test_resume_reaches_the_same_parameters_and_curve(workdir, pretrained):
    args = [
        "recipe.toml",
        "--set",
        "stages.instruct.max_steps=6",
        "--set",
        "stages.instruct.save_steps=2",
    ]
    cli("instruct", *args, "--out", "run", "--init", "run/pretrain")
    full = weights(workdir / "run/instruct")
    full_rows = (workdir / "run/instruct-state/metrics.jsonl").read_text().splitlines()

    code = (
        "from moetool.recipe import load_recipe\n"
        "from moetool.train.runner import run_stage\n"
        "r = load_recipe('recipe.toml', ['stages.instruct.max_steps=6', "
        "'stages.instruct.save_steps=2'])\n"
        "run_stage(r, 'instruct', 'run_b', init='run/pretrain', stop_after=3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    assert not (workdir / "run_b/instruct").exists()  # interrupted after step 3
    checkpoints = workdir / "run_b/instruct-state/checkpoints"
    assert (checkpoints / "step-2/moetool.json").is_file()  # complete: every rank saved
    # Resuming with another recipe is refused, naming the difference.
    other = cli(
        "instruct",
        *args,
        "--set",
        "stages.instruct.lr=1e-3",
        "--out",
        "run_b",
        "--init",
        "run/pretrain",
        "--resume",
        check=False,
    )
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "belongs to another run" in other.stderr
    assert "recipe.stages.instruct.lr: 0.0002 -> 0.001" in other.stderr
    # DeepSpeed's `latest` pointer left empty by a crash: the complete step-2 is used anyway.
    (checkpoints / "latest").write_text("")
    cli("instruct", *args, "--out", "run_b", "--init", "run/pretrain", "--resume")
    resumed = weights(workdir / "run_b/instruct")
    assert not changed(full, resumed)
    rows = (workdir / "run_b/instruct-state/metrics.jsonl").read_text().splitlines()
    # Steps 1-3 ran before the interruption, 3 was redone from the step-2 checkpoint: one row
    # per step, the same losses.
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(r)["loss"] for r in rows] == [json.loads(r)["loss"] for r in full_rows]
    # save_total_limit = 2 kept the newest two complete checkpoints (steps 2 and 4).
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2", "step-4"]


def test_kill_9_at_a_random_step_then_resume_gives_the_same_run(workdir, pretrained):
    """SIGKILL lands wherever it lands (mid-step or mid-checkpoint): --resume still reaches the
    uninterrupted run's weights and losses, with one metrics row per step."""
    import random
    import signal
    import time

    args = [
        "instruct",
        "recipe.toml",
        "--init",
        "run/pretrain",
        "--set",
        "stages.instruct.max_steps=6",
        "--set",
        "stages.instruct.save_steps=1",
    ]
    cli(*args, "--out", "full")
    kill_after = random.randint(1, 5)
    proc = subprocess.Popen(
        [SCRIPT, *args, "--out", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = workdir / "killed/instruct-state/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "killed/instruct").exists(), f"finished before the kill ({kill_after})"
    cli(*args, "--out", "killed", "--resume")
    assert not changed(weights(workdir / "full/instruct"), weights(workdir / "killed/instruct"))
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    full = [json.loads(r) for r in (workdir / "full/instruct-state/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], f"killed after step {kill_after}"
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]


def test_overwrite_then_resume_never_continues_the_old_run(workdir, pretrained):
    """A finished run; --overwrite with another lr, killed after one step; then --resume
    --overwrite: it must not load the first run's checkpoints (it starts the new run again)."""
    first = ["--set", "stages.instruct.max_steps=4", "--set", "stages.instruct.save_steps=2"]
    cli("instruct", "recipe.toml", *first, "--out", "run")
    second = [*first, "--set", "stages.instruct.lr=1e-4", "--set", "stages.instruct.seed=7"]
    code = (
        "from moetool.recipe import load_recipe\n"
        "from moetool.train.runner import run_stage\n"
        "r = load_recipe('recipe.toml', ['stages.instruct.max_steps=4', "
        "'stages.instruct.save_steps=2', 'stages.instruct.lr=1e-4', 'stages.instruct.seed=7'])\n"
        "run_stage(r, 'instruct', 'run', overwrite=True, stop_after=1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    assert not list((workdir / "run/instruct-state").glob("checkpoints/step-*"))
    cli("instruct", "recipe.toml", *second, "--out", "run", "--resume", "--overwrite")
    cli("instruct", "recipe.toml", *second, "--out", "clean", "--init", "run/pretrain")
    assert not changed(weights(workdir / "clean/instruct"), weights(workdir / "run/instruct"))
    rows = (workdir / "run/instruct-state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]


def test_overwrite_refuses_an_output_that_holds_an_input(workdir, pretrained):
    # Stage instruct would write run/instruct/ while reading its --init from inside it.
    proc = cli(
        "instruct",
        "recipe.toml",
        "--out",
        "run",
        "--init",
        "run/instruct/../instruct/x",
        check=False,
    )
    assert proc.returncode == 2 and "contains its input run/instruct/../instruct/x" in proc.stderr
    moved = cli(
        "pretrain",
        "recipe.toml",
        "--out",
        "run",
        "--init",
        "run/pretrain",
        "--overwrite",
        check=False,
    )
    assert moved.returncode == 2 and "contains its input run/pretrain" in moved.stderr
    assert (workdir / "run/pretrain/config.json").is_file()  # nothing deleted
    upcycle = cli("upcycle", "run/pretrain/..", "run", "--overwrite", check=False)
    assert upcycle.returncode == 2 and "contains this command's input" in upcycle.stderr
    inner = cli("upcycle", "run/pretrain", "run", "--overwrite", check=False)
    assert inner.returncode == 2 and "contains this command's input run/pretrain" in inner.stderr
    assert (workdir / "run/pretrain/config.json").is_file()


def test_bad_data_stops_with_file_and_sample(workdir):
    data = json.loads((workdir / "data/stage1.json").read_text())
    data[3]["image"] = "img/missing.png"
    (workdir / "data/stage1.json").write_text(json.dumps(data))
    proc = cli("pretrain", "recipe.toml", "--out", "run", check=False)
    assert proc.returncode == 2
    assert "stage1.json, sample 'c3'" in proc.stderr and "missing.png" in proc.stderr
    assert not (workdir / "run/pretrain").exists()
    assert not (workdir / "run/pretrain-state").exists()  # nothing left of a failed start
    ok = cli(
        "pretrain",
        "recipe.toml",
        "--out",
        "run2",
        "--set",
        "data.skip_bad_samples=true",
        "--set",
        "stages.pretrain.max_steps=1",
        "--json",
    )
    assert json.loads(ok.stdout)["steps"] == 1


def test_two_process_gloo_run_with_zero2_and_zero3(workdir, pretrained):
    """bf16 stages under ZeRO-2 and ZeRO-3 (ZeRO-3 loads partitioned and gathers the weights
    through DeepSpeed's public GatheredParameters): both final checkpoints hold every key, full
    shapes, in the one documented dtype, the stage's precision (ZeRO-2 used to save fp32 and
    ZeRO-3 bf16)."""

    def launch(*args):
        proc = torchrun("-m", "moetool", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)  # only rank 0 reports

    two = launch(
        "instruct",
        "recipe.toml",
        "--out",
        "run",
        "--set",
        "stages.instruct.zero_stage=2",
        "--set",
        "stages.instruct.precision=bf16",
        "--set",
        "stages.instruct.max_steps=3",
        "--json",
    )
    three = launch(
        "moe-tune",
        "recipe.toml",
        "--out",
        "run",
        "--set",
        "stages.moe_tune.zero_stage=3",
        "--set",
        "stages.moe_tune.precision=bf16",
        "--set",
        "stages.moe_tune.max_steps=3",
        "--json",
    )
    assert two["steps"] == three["steps"] == 3
    before = weights(workdir / "run/moe_tune-state/upcycled")
    after = weights(workdir / "run/moe_tune")
    assert set(before) == set(after)
    assert all(before[k].shape == after[k].shape for k in before)  # ZeRO-3 state gathered
    moved = changed(before, after)
    assert moved and all(".mlp." in k for k in moved)
    for stage in ("instruct", "moe_tune"):
        saved = weights(workdir / "run" / stage)
        assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
        assert json.loads((workdir / "run" / stage / "config.json").read_text())["dtype"] == (
            "bfloat16"
        )


def test_non_finite_loss_stops_the_stage_keeping_the_last_good_checkpoint(workdir, pretrained):
    proc = cli(
        "instruct",
        "recipe.toml",
        "--out",
        "run",
        "--set",
        "stages.instruct.lr=1e30",
        "--set",
        "stages.instruct.warmup_ratio=0",
        "--set",
        "stages.instruct.max_steps=6",
        "--set",
        "stages.instruct.save_steps=1",
        "--set",
        "stages.instruct.max_grad_norm=0",
        check=False,
    )
    assert proc.returncode == 2
    assert "non-finite loss" in proc.stderr and "instruct-state/checkpoints" in proc.stderr
    assert not (workdir / "run/instruct").exists()
    assert (workdir / "run/instruct-state/checkpoints/latest").exists()


NAN_ON_RANK_1 = """
import os, sys
import deepspeed

real = deepspeed.initialize


def initialize(*args, **kwargs):
    engine, *rest = real(*args, **kwargs)
    if os.environ["RANK"] == "1":
        forward, calls = engine.forward, [0]

        def nan_at_second_call(*a, **k):
            out = forward(*a, **k)
            calls[0] += 1
            if calls[0] == 2:
                out["loss"] = out["loss"] * float("nan")
            return out

        engine.forward = nan_at_second_call
    return (engine, *rest)


deepspeed.initialize = initialize
from moetool.cli.app import main

sys.argv = ["moetool", *sys.argv[1:]]
main()
"""


def test_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(workdir, pretrained):
    (workdir / "nan_on_rank_1.py").write_text(NAN_ON_RANK_1)
    proc = torchrun(
        "nan_on_rank_1.py",
        "instruct",
        "recipe.toml",
        "--out",
        "run",
        "--set",
        "stages.instruct.max_steps=4",
        "--set",
        "stages.instruct.save_steps=1",
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert "rank 1: non-finite loss (nan) at step 2" in errors[0]
    assert "instruct-state/checkpoints/step-1" in errors[0]
    # The ranks print no traceback (torchrun reports the failed children with its own).
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr
    assert "Connection closed" not in proc.stderr and "connection" not in errors[0].lower()
    assert not (workdir / "run/instruct").exists()


def test_bad_samples_met_mid_run_are_skipped_and_counted_or_stop_the_stage(workdir, pretrained):
    """A truncated image (it exists, so parsing passes) and an answer cut off by max_length are
    found only when a worker encodes them: with the switch they are skipped and counted, without
    it the stage stops naming the sample."""
    data = json.loads((workdir / "data/stage2.json").read_text())
    png = (workdir / "data/img/5.png").read_bytes()
    (workdir / "data/img/truncated.png").write_bytes(png[: len(png) // 3])
    data[5]["image"] = "img/truncated.png"
    data[6]["conversations"][0]["value"] = "<image>\n" + "word " * 800
    (workdir / "data/stage2.json").write_text(json.dumps(data))
    common = ["--init", "run/pretrain", "--set", "stages.instruct.max_steps=0"]  # whole epoch
    ok = cli(
        "instruct",
        "recipe.toml",
        "--out",
        "skip",
        *common,
        "--set",
        "data.skip_bad_samples=true",
        "--json",
    )
    result = json.loads(ok.stdout)
    assert result["skipped"] == {"unreadable image": 1, "no answer left (every label masked)": 1}
    rows = [json.loads(r) for r in (workdir / "skip/instruct-state/metrics.jsonl").open()]
    assert sum(r["skipped"] for r in rows) == 2 and len(rows) == 12
    stop = cli("instruct", "recipe.toml", "--out", "stop", *common, check=False)
    assert stop.returncode == 2 and "Traceback" not in stop.stderr
    assert "sample 'q5'" in stop.stderr or "sample 'q6'" in stop.stderr
    assert not (workdir / "stop/instruct").exists()


FULL_DISK_AT_FINAL_SAVE = """
import errno, os, sys
from pathlib import Path
import safetensors.torch

real = safetensors.torch.save_file


def save_file(tensors, filename, metadata=None):
    folder = Path(filename).parent.name
    if ".tmp-" not in folder:  # only the final checkpoint's temporary folder is "full"
        return real(tensors, filename, metadata=metadata)
    real(tensors, os.environ["WOULD_HAVE_SAVED"], metadata=metadata)  # what was lost, for the test
    raise OSError(errno.ENOSPC, "No space left on device", filename)


safetensors.torch.save_file = save_file
from moetool.cli.app import main

sys.argv = ["moetool", *sys.argv[1:]]
main()
"""


def test_full_disk_at_the_final_save_keeps_the_trained_state_for_resume(workdir, pretrained):
    """With the default save_steps = 0 a failed final write used to lose the whole stage: now
    every rank stops with one error line, nothing half-written stays, the trained state is kept
    as a checkpoint and --resume writes from it exactly the weights the failed save held."""
    (workdir / "full_disk.py").write_text(FULL_DISK_AT_FINAL_SAVE)
    args = ["instruct", "recipe.toml", "--out", "run", "--set", "stages.instruct.max_steps=3"]
    lost = str(workdir / "lost.safetensors")

    failed = torchrun("full_disk.py", *args, WOULD_HAVE_SAVED=lost)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], failed.stderr[-3000:]
    assert "could not write the final checkpoint run/instruct" in errors[0]
    assert "No space left on device" in errors[0] and "run again" in errors[0]
    assert "instruct-state/checkpoints/step-3" in errors[0] and "--resume" in errors[0]
    assert failed.stderr.count("Traceback") == 1  # torchrun's report of its failed children
    assert not (workdir / "run/instruct").exists()
    assert [p.name for p in (workdir / "run").iterdir() if ".tmp-" in p.name] == []
    assert (workdir / "run/instruct-state/checkpoints/step-3/moetool.json").is_file()

    resumed = torchrun("-m", "moetool", *args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["steps"] == 3
    lost = load_file(workdir / "lost.safetensors")
    assert not changed(lost, weights(workdir / "run/instruct"))
    rows = (workdir / "run/instruct-state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]


def test_the_recipe_attention_is_trained_with_recorded_and_used_by_inference(workdir):
    """Stage I builds with it, stage III upcycles on the fly and loads with it; each final
    checkpoint records it and inference loads with it unless told otherwise."""
    from moetool.models.inference import load_checkpoint

    attention = ["--set", "model.attn_implementation=eager"]
    steps = ["--set", "stages.pretrain.max_steps=1", "--set", "stages.moe_tune.max_steps=1"]
    cli("pretrain", "recipe.toml", "--out", "run", *attention, *steps)
    cli("moe-tune", "recipe.toml", "--out", "run", "--init", "run/pretrain", *attention, *steps)
    for stage in ("pretrain", "moe_tune"):
        meta = json.loads((workdir / f"run/{stage}/config.json").read_text())["moetool"]
        assert meta["attn_implementation"] == "eager", stage
        assert meta["recipe"]["model"]["attn_implementation"] == "eager", stage
    upcycled = json.loads((workdir / "run/moe_tune-state/upcycled/config.json").read_text())
    assert upcycled["moetool"]["attn_implementation"] == "eager"  # carried from stage I's
    for override, expected in ((None, "eager"), ("sdpa", "sdpa")):
        model, _ = load_checkpoint(workdir / "run/moe_tune", attn_implementation=override)
        parts = (model.config, model.model.vision_tower.config, model.model.language_model.config)
        assert [c._attn_implementation for c in parts] == [expected] * 3, override
