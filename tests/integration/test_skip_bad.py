"""``data.skip_bad_samples``: a run goes on while good samples remain, whichever micro-batch
the bad ones fill (the very first included), on every rank in step, with an exact count; it
stops, on every rank with one message, only when no sample of the stage's data is good."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.data.pipeline import StageBatchSampler

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SKIP = ["--set", "data.skip_bad_samples=true"]
SEED = 42  # the tiny recipes' stage seed (the schema's default)


def first_epoch_order(world: int, n: int = 48) -> list[int]:
    """The order stage I takes the samples in (micro-batch 2, as tiny/_base.toml)."""
    return StageBatchSampler([None] * n, 2, 0, world, SEED).order(0)


def corrupt(workdir: Path, indices) -> None:
    """Truncate the images of the given samples: they still exist (parsing passes), but no
    longer decode, so only the worker that encodes them finds out."""
    for i in indices:
        png = workdir / f"data/img/{i}.png"
        png.write_bytes(png.read_bytes()[:40])


def run(*argv, launcher=()):
    proc = subprocess.run(
        [*launcher, *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="250"),
    )
    return proc


def two_ranks(*argv):
    return run(*argv, launcher=(str(BIN / "torchrun"), "--nproc_per_node", "2"))


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_half_of_the_images_corrupt_the_first_micro_batch_among_them(workdir):
    """24 of 48 images truncated, the two of the first micro-batch among them: the whole epoch
    trains, each bad sample is counted once, every loss is finite."""
    order = first_epoch_order(world=1)
    bad = set(order[:2]) | set(order[3::2][:22])
    assert len(bad) == 24
    corrupt(workdir, bad)
    proc = run(
        str(BIN / "moetool"), "pretrain", "recipe.toml", "--out", "run", *SKIP,
        "--set", "stages.pretrain.max_steps=0", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["steps"] == 12 and result["skipped"] == {"unreadable image": 24}
    rows = metrics(workdir / "run/pretrain-state/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["skipped"] == 2 + (order[3] in bad)  # step 1: micro-batches 0 and 1
    assert sum(r["skipped"] for r in rows) == 24
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (workdir / "run/pretrain/config.json").is_file()


def test_an_all_bad_first_micro_batch_is_passed_over(workdir):
    order = first_epoch_order(world=1)
    corrupt(workdir, order[:2])
    proc = run(
        str(BIN / "moetool"), "pretrain", "recipe.toml", "--out", "run", *SKIP,
        "--set", "stages.pretrain.max_steps=2", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["steps"] == 2 and result["skipped"] == {"unreadable image": 2}
    rows = metrics(workdir / "run/pretrain-state/metrics.jsonl")
    assert [r["skipped"] for r in rows] == [2, 0]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


RUN_STAGE_PER_RANK = """
import json, os, sys
from pathlib import Path
from moetool.recipe import load_recipe
from moetool.train.runner import run_stage

recipe = load_recipe("recipe.toml", ["data.skip_bad_samples=true", "stages.pretrain.max_steps=3"])
steps = []
result = run_stage(recipe, "pretrain", "run", on_step=lambda m: steps.append(m.skipped))
Path(f"rank-{os.environ['RANK']}.json").write_text(
    json.dumps({"steps": result.steps, "skipped": result.skipped, "per_step": steps})
)
"""


def test_two_ranks_stay_in_step_when_one_ranks_first_micro_batch_is_all_bad(workdir):
    """Rank 0's first micro-batch is all bad and rank 1's is good (and rank 1 meets one bad
    sample at step 2): both ranks train the same three steps and learn the same total."""
    order = first_epoch_order(world=2)  # step s, rank r: order[4(s-1) + 2r : 4(s-1) + 2r + 2]
    corrupt(workdir, [order[0], order[1], order[6]])
    (workdir / "per_rank.py").write_text(RUN_STAGE_PER_RANK)
    proc = two_ranks("per_rank.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((workdir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["steps"] == 3 and seen["skipped"] == {"unreadable image": 3}
    assert ranks[0]["per_step"] == [2, 1, 0]  # on_step runs on rank 0: totals of both ranks
    rows = metrics(workdir / "run/pretrain-state/metrics.jsonl")
    assert [r["skipped"] for r in rows] == [2, 1, 0]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_no_good_sample_at_all_stops_every_rank_with_one_message(workdir):
    corrupt(workdir, range(48))
    proc = two_ranks("-m", "moetool", "pretrain", "recipe.toml", "--out", "run", *SKIP)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert "no sample of the stage's data can be used" in errors[0]
    assert "stage1.json, sample 'c" in errors[0] and "unreadable" in errors[0]
    assert not (workdir / "run/pretrain").exists()


INTERRUPTED_AFTER_STEP_2 = """
from moetool.recipe import load_recipe
from moetool.train.runner import run_stage

recipe = load_recipe("recipe.toml", ["data.skip_bad_samples=true", "stages.pretrain.max_steps=4",
                                     "stages.pretrain.save_steps=2"])
run_stage(recipe, "pretrain", "run_b", stop_after=2)
"""


def test_a_resumed_run_whose_first_micro_batches_are_all_bad_matches_the_uninterrupted_one(
    workdir,
):
    """Step 3's two micro-batches are all bad: a run resumed from the step-2 checkpoint meets
    them before any good one, goes on, and ends with the uninterrupted run's weights, losses and
    counts (the sampler's order is not changed by looking for a good stand-in)."""
    from safetensors.torch import load_file

    order = first_epoch_order(world=1)
    corrupt(workdir, order[8:12])  # step 3 = micro-batches 4 and 5
    args = ["recipe.toml", *SKIP, "--set", "stages.pretrain.max_steps=4"]
    args += ["--set", "stages.pretrain.save_steps=2", "--json"]
    full = run(str(BIN / "moetool"), "pretrain", *args, "--out", "run")
    assert full.returncode == 0, full.stderr[-3000:]
    (workdir / "interrupt.py").write_text(INTERRUPTED_AFTER_STEP_2)
    stopped = run(sys.executable, "interrupt.py")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (workdir / "run_b/pretrain").exists()
    resumed = run(str(BIN / "moetool"), "pretrain", *args, "--out", "run_b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(workdir / "run/pretrain/model.safetensors")
    b = load_file(workdir / "run_b/pretrain/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    rows_a = metrics(workdir / "run/pretrain-state/metrics.jsonl")
    rows_b = metrics(workdir / "run_b/pretrain-state/metrics.jsonl")
    assert [(r["loss"], r["skipped"]) for r in rows_a] == [
        (r["loss"], r["skipped"]) for r in rows_b
    ]
    assert [r["skipped"] for r in rows_b] == [0, 0, 4, 0]
