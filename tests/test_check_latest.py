"""scripts/check-latest, the drift check: its pieces report by name (the whole script installs a
venv, so CI runs it only through these pieces; docs/install.md has its last results)."""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check-latest"


@pytest.fixture(scope="module")
def check_latest():
    loader = importlib.machinery.SourceFileLoader("check_latest", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_a_failing_piece_is_named_with_the_tail_of_its_output(check_latest, tmp_path):
    steps = []
    code = "print('\\n'.join(f'line {i}' for i in range(100))); raise SystemExit(3)"
    with pytest.raises(check_latest.StepFailed) as failed:
        check_latest.run_step(
            "eval pope (lmms-eval)", [sys.executable, "-c", code], tmp_path, dict(os.environ),
            tmp_path, steps,
        )  # fmt: skip
    assert failed.value.step == "eval pope (lmms-eval)"
    assert failed.value.tail.splitlines() == [f"line {i}" for i in range(60, 100)]
    assert steps == [
        {"name": "eval pope (lmms-eval)", "ok": False, "seconds": steps[0]["seconds"],
         "log": str(failed.value.log)},
    ]  # fmt: skip
    output = check_latest.run_step(
        "pip check", [sys.executable, "-c", "print('ok')"], tmp_path, dict(os.environ),
        tmp_path, steps,
    )  # fmt: skip
    assert output == "ok\n" and steps[-1]["ok"] is True


def test_the_lock_is_written_only_from_a_tested_set():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--write-lock", "--tests", "none"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--write-lock needs the tests" in proc.stderr
