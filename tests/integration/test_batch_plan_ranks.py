"""Any GPU count: on 2 ranks a recipe whose per-device batch does not divide its global batch
trains with the per-device batch that does (and says so), resumes with it, and a world size that
cannot keep the global batch is refused before any work."""

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
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# 4 per device x 2 ranks does not divide 12: 3 per device x 2 ranks x 2 accumulation steps.
BATCH = [
    "--set",
    "stages.pretrain.global_batch_size=12",
    "--set",
    "stages.pretrain.per_device_batch_size=4",
]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "-m", "moetool", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, COLUMNS="250"),
    )


def weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_two_ranks_take_the_derived_per_device_batch_and_resume_with_it(workdir):
    args = ["pretrain", "recipe.toml", "--out", "run", *BATCH, "--set"]
    args += ["stages.pretrain.max_steps=3", "--set", "stages.pretrain.save_steps=2"]
    proc = torchrun(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = (
        "stages.pretrain: per_device_batch_size 4 x 2 ranks does not divide global_batch_size "
        "12; using 3 per device x 2 ranks x 2 accumulation steps = 12"
    )
    assert proc.stderr.count(line) == 1  # said once, by rank 0
    assert json.loads(proc.stdout)["steps"] == 3
    final = workdir / "run/pretrain"
    training = json.loads((final / "config.json").read_text())["moetool"]["training"]
    assert training == {
        "world_size": 2,
        "per_device_batch_size": 3,
        "gradient_accumulation_steps": 2,
        "global_batch_size": 12,
        "optimizer": "AdamW",
    }
    whole = weights(final)

    # The checkpoint of step 2 resumes (the fingerprint agrees) and step 3 is trained again on
    # the same derived micro-batches: the same weights.
    shutil.move(final, workdir / "uninterrupted")
    resumed = torchrun(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (workdir / "run/pretrain-state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    again = weights(final)
    assert set(again) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused(workdir):
    odd = ["stages.pretrain.global_batch_size=3", "stages.pretrain.per_device_batch_size=3"]
    proc = torchrun("pretrain", "recipe.toml", "--out", "run", "--set", odd[0], "--set", odd[1])
    assert proc.returncode != 0
    assert (
        "error: stages.pretrain.global_batch_size 3 cannot be split evenly over 2 ranks: run on "
        "a world size that divides it (1, 3) or set it to a multiple of 2 (e.g. 2 or 4)"
    ) in proc.stderr
    assert proc.stderr.count("Traceback") == 1  # torchrun's report of its failed children
    assert not (workdir / "run/pretrain-state").exists()  # refused before any work
