"""Start-up on a fresh install: a CPU stage builds no DeepSpeed op before its first step.

DeepSpeed's CPU communication backend JIT-builds its shared-memory op (``deepspeed_shm_comm``,
a minute or more, needs ninja) the first time it initialises, under ``TORCH_EXTENSIONS_DIR``;
only its tensor-parallel inference all-reduce uses the op, never training. A fresh, empty
``TORCH_EXTENSIONS_DIR`` stands for a fresh install."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
STEPS = ["--set", "stages.pretrain.max_steps=2", "--json"]


def run(argv: list[str], extensions: Path) -> subprocess.CompletedProcess:
    extensions.mkdir()
    env = dict(os.environ, COLUMNS="250", TORCH_EXTENSIONS_DIR=str(extensions))
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)


def test_a_one_process_stage_builds_no_deepspeed_op(workdir):
    extensions = workdir / "torch_extensions"
    argv = [str(BIN / "moetool"), "pretrain"]
    proc = run([*argv, "recipe.toml", "--out", "run", *STEPS], extensions)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in extensions.iterdir()) == []


def test_a_two_process_stage_builds_no_deepspeed_op(workdir):
    extensions = workdir / "torch_extensions"
    argv = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "moetool", "pretrain"]
    proc = run([*argv, "recipe.toml", "--out", "run", *STEPS], extensions)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in extensions.iterdir()) == []
