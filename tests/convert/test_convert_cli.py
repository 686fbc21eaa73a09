"""`moetool convert` through the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_convert import official_checkpoint  # tests/convert/ is on sys.path (prepend mode)

BIN = Path(sys.executable).parent / "moetool"


def run(*args):
    env = dict(os.environ, COLUMNS="150")
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, timeout=600)


def test_convert_json_summary_and_one_clear_error(tmp_path):
    src, _, _ = official_checkpoint(tmp_path, "qwen")
    vision = str(src.parent / "vision-config.json")
    out = tmp_path / "out"
    proc = run(
        "convert", str(src), str(out), "--from", "moe-llava", "--vision-config", vision, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model_type"] == "moe_llava_qwen" and summary["text_model_type"] == "qwen2"
    assert summary["moe"]["layers"] == [0, 2] and summary["moe"]["eval_capacity_factor"] == 0.0
    assert summary["template"] == "qwen" and summary["dropped"] == []
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moetool_llava" and config["moetool"]["stage"] == "converted"

    again = run("convert", str(src), str(out), "--from", "moe-llava", "--vision-config", vision)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    kept = run(
        "convert",
        str(src),
        str(out),
        "--from",
        "moe-llava",
        "--vision-config",
        vision,
        "--keep-capacity",
        "--overwrite",
    )
    assert kept.returncode == 0, kept.stderr
    assert "official capacity" in kept.stdout
    assert json.loads((out / "config.json").read_text())["moe"]["eval_capacity_factor"] == 2.0

    # An OUT that holds the input is refused, not replaced (it would delete the checkpoint).
    inside = run(
        "convert",
        str(src),
        str(src.parent),
        "--from",
        "moe-llava",
        "--vision-config",
        vision,
        "--overwrite",
    )
    assert inside.returncode == 2 and "contains this command's input" in inside.stderr
    assert (src / "model.safetensors").is_file() and "Traceback" not in inside.stderr

    wrong = run("convert", str(src), str(tmp_path / "x"), "--from", "llava-1.5")
    assert wrong.returncode == 2 and "moe-llava" in wrong.stderr and "Traceback" not in wrong.stderr
    (src / "model.safetensors").unlink()
    broken = run(
        "convert", str(src), str(tmp_path / "y"), "--from", "moe-llava", "--vision-config", vision
    )
    assert broken.returncode == 2 and "no weights" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "y").exists()
