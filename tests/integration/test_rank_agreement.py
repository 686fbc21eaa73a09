"""The ranks agree once per optimizer step (``train.ranks.agree_on_step``), with the next step's
micro-batches loaded ahead: a bad sample that only one rank meets stops both ranks with one
message, after the step before it was logged and saved, and never leaves a rank running a pass
the other does not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.data.pipeline import StageBatchSampler

pytestmark = pytest.mark.integration
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def test_a_bad_sample_on_one_rank_stops_both_after_the_step_before_it(workdir):
    # Two ranks, micro-batch 2, global batch 4: step s, rank r trains order[4(s-1) + 2r :][:2].
    order = StageBatchSampler([None] * 48, 2, 0, 2, 42).order(0)
    png = workdir / f"data/img/{order[4]}.png"  # step 2, rank 0; rank 1's samples are good
    png.write_bytes(png.read_bytes()[:40])
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "-m", "moetool", "pretrain", "recipe.toml",
         "--out", "run", "--set", "stages.pretrain.max_steps=3",
         "--set", "stages.pretrain.save_steps=1"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="250"),
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert "rank 0: " in errors[0] and "rank 1:" not in errors[0]
    assert f"sample 'c{order[4]}'" in errors[0] and "unreadable" in errors[0]
    assert "pretrain-state/checkpoints/step-1" in errors[0]
    rows = (workdir / "run/pretrain-state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]
    assert not (workdir / "run/pretrain").exists()
