"""report_to: TensorBoard event files and offline wandb runs hold the stage's step metrics."""

import glob
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
SCRIPT = os.path.join(os.path.dirname(sys.executable), "moetool")


def cli(*args, env=None):
    proc = subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200", **(env or {})),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(path):
    return [json.loads(line) for line in open(path)]


def test_tensorboard_events_hold_one_value_per_step_across_a_resume(workdir, pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [
        "stages.instruct.max_steps=5",
        "stages.instruct.save_steps=2",
        "tracking.report_to=tensorboard",
    ]
    code = (
        "from moetool.recipe import load_recipe\n"
        "from moetool.train.runner import run_stage\n"
        f"r = load_recipe('recipe.toml', {overrides!r})\n"
        "run_stage(r, 'instruct', 'run', stop_after=3)\n"  # steps 1-3; the checkpoint is step 2
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    args = [f"--set={o}" for o in overrides]
    cli("instruct", "recipe.toml", "--out", "run", *args, "--resume")
    events = EventAccumulator(str(workdir / "run/instruct-state/tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    rows = metrics(workdir / "run/instruct-state/metrics.jsonl")
    # Step 3 was trained twice (before and after the interruption): one event, as one row.
    assert [s for s, _ in loss] == [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"train/lm_loss", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_wandb_offline_run_holds_every_step_and_needs_no_network(workdir, pretrained):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    cli(
        "moe-tune",
        "recipe.toml",
        "--out",
        "run",
        "--init",
        "run/pretrain",
        "--set",
        "stages.moe_tune.max_steps=3",
        "--set",
        "tracking.report_to=wandb",
        "--set",
        "tracking.project=moetool-test",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "HTTPS_PROXY": "http://127.0.0.1:9"},
    )
    (run_file,) = glob.glob(str(workdir / "run/moe_tune-state/wandb/offline-run-*/run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(run_file)
    history, config = [], None
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind == "run":
            config = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.run.config.update
            }
            assert record.run.project == "moetool-test"
    rows = metrics(workdir / "run/moe_tune-state/metrics.jsonl")
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["train/loss"] for h in history] == [r["loss"] for r in rows]
    assert [h["train/aux_loss_per_layer"] for h in history] == [r["aux_loss"] for r in rows]
    assert config["moe"]["num_experts"] == 4  # the recipe is the run's config
