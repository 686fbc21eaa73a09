"""docs/gpu-guide.md's walkthrough (section 7) runs as written, at tiny size.

The guide marks its blocks: ``<!-- walkthrough: recipe -->`` (the user's recipe file, validated
against the bundled recipes here), ``<!-- walkthrough: settings -->`` (shell settings, replaced by
tiny ones: a tiny Phi recipe, synthetic data, one process), ``<!-- walkthrough -->`` (commands, run
verbatim in order) and ``<!-- walkthrough: sbatch -->`` (the SLURM script, run with ``srun`` and
``scontrol`` stood in for, two gloo processes on one node). Every ``moetool`` or ``$L`` command of
section 7 outside those blocks fails the test, so the guide cannot grow an untested command.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.recipe.paths import recipes_root

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs/gpu-guide.md"
BIN = Path(sys.executable).parent
MARK = re.compile(r"^<!-- walkthrough(?::\s*(\w+))? -->$")


def walkthrough_blocks() -> list[tuple[str | None, str, str]]:
    """(mark or None, fence language, text) of every fenced block of section 7, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## 7. Walkthrough") : text.index("\n## 8. ")]
    lines = section.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            back = i - 1
            while back >= 0 and not lines[back].strip():
                back -= 1
            match = MARK.match(lines[back].strip()) if back >= 0 else None
            mark = None if match is None else (match[1] or "run")
            blocks.append((mark, lang, "\n".join(lines[i + 1 : j]) + "\n"))
            i = j
        i += 1
    return blocks


def test_every_command_of_the_walkthrough_is_marked_to_run():
    blocks = walkthrough_blocks()
    marks = [mark for mark, _, _ in blocks]
    assert marks.count("recipe") == 1 and marks.count("settings") == 1
    assert marks.count("sbatch") == 1 and marks.count("run") >= 4
    for mark, lang, text in blocks:
        if mark is not None or lang != "bash":
            continue
        # Unmarked blocks may only hold what a CPU test cannot run: SLURM's and vLLM's commands.
        for line in text.splitlines():
            command = line.strip()
            if command and not command.startswith("#"):
                assert re.match(r"(export |one=|two=|sbatch |vllm serve )", command), (
                    f"docs/gpu-guide.md section 7: `{command}` is in no walkthrough block"
                )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guide")
    data = root / "datasets"
    subprocess.run(
        [str(BIN / "moetool"), "data", "synth", str(data), "--stage1", "48", "--stage2", "48",
         "--stage3", "48", "--eval-images", "12"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return root


def test_the_users_recipe_extends_the_bundled_one_and_loads(tmp_path):
    from moetool.recipe.load import load_recipe

    (recipe,) = [text for mark, _, text in walkthrough_blocks() if mark == "recipe"]
    assert 'extends = "/path/to/moetool/recipes/phi2-2.7b/moe-4x-top2.toml"' in recipe
    path = tmp_path / "phi2-moe.toml"
    path.write_text(recipe.replace("/path/to/moetool/recipes", str(recipes_root())))
    loaded = load_recipe(path)
    assert loaded.name == "MoE-LLaVA-2.7B×4-Top2"
    assert loaded.model.path == "/models/phi-2"
    assert loaded.data.root == "/datasets/moe-llava/train_json"


def tiny_settings(world: Path, run: Path, launcher: str) -> str:
    """The walkthrough's settings at tiny size: the tiny Phi recipe on the synthetic world."""
    data = world / "datasets"
    recipe = world / "phi2-moe.toml"
    recipe.write_text(
        f'extends = "{recipes_root() / "tiny/phi.toml"}"\n'
        f'[data]\nroot = "{data}"\nimage_folder = "{data}"\n'
    )
    image = sorted((data / "images/train").iterdir())[0]
    return (
        f"RECIPE={recipe}\nRUN={run}\nLMMS={data / 'lmms'}\nTASKS=pope\nDEVICE=cpu\n"
        f"DATA={data}\nIMAGE={image}\nSAMPLES={data / 'stage3.json'}\nL={launcher}\n"
    )


def bash(script: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", COLUMNS="120", **(env or {}))
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ,
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


def test_the_walkthrough_runs_as_written(tiny_world):
    run = tiny_world / "runs/phi2-moe"
    run.parent.mkdir()
    settings = tiny_settings(tiny_world, run, "moetool")
    commands = [text for mark, _, text in walkthrough_blocks() if mark == "run"]
    done = bash(settings + "\n".join(commands), cwd=tiny_world)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for stage in ("pretrain", "instruct", "moe_tune"):
        assert (run / stage / "config.json").is_file()
    assert json.loads((run / "moe_tune/config.json").read_text())["moe"]["num_experts"] == 4
    check = json.loads((tiny_world / "runs/phi2-moe-data-check.json").read_text())
    assert check  # the --json report of stage III's data
    results = json.loads((tiny_world / "runs/phi2-moe-evals/pope/results.json").read_text())
    assert results
    assert (tiny_world / "runs/phi2-moe-routing").is_dir()


def test_the_slurm_script_runs_a_stage_on_two_processes(tiny_world, tmp_path):
    (script,) = [text for mark, _, text in walkthrough_blocks() if mark == "sbatch"]
    assert script.startswith("#!/bin/bash\n#SBATCH")
    sbatch = tmp_path / "phi2-moe.sbatch"
    sbatch.write_text(script)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nexec "$@"\n')  # one task: this node
    (shims / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    run = tmp_path / "run"
    settings = tiny_settings(tiny_world, run, "moetool")
    env = {
        "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
        "SLURM_JOB_ID": "7", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    done = bash(
        f"export PATH={shims}:$PATH\n{settings}export RECIPE RUN\nbash {sbatch} pretrain",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    config = json.loads((run / "pretrain/config.json").read_text())
    assert config["moetool"]["stage"] == "pretrain"
    rows = [json.loads(line) for line in (run / "pretrain-state/metrics.jsonl").open()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1)) and rows
