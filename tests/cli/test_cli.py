"""The real console script, run in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.cli.app import COMMANDS, GROUPS

SCRIPT = shutil.which("moetool", path=str(Path(sys.executable).parent)) or shutil.which("moetool")
TABLE8_KEYS = {
    "name",
    "paper_total_b",
    "paper_activated_b",
    "formula_total",
    "formula_activated",
    "exact_total",
    "exact_activated",
}


def run(*args, check=True):
    assert SCRIPT, "the moetool console script is not installed"
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_exactly_the_working_commands():
    out = run("--help").stdout
    listed = set()
    in_commands = False
    for line in out.splitlines():
        if "Commands" in line:
            in_commands = True
            continue
        if in_commands and line.startswith("│ ") and line[2] != " ":
            listed.add(line[2:].split()[0])
    assert listed == set(COMMANDS) | set(GROUPS)
    for name in ("pretrain", "instruct", "upcycle", "moe-tune", "eval"):
        if name not in COMMANDS:
            assert run(name, check=False).returncode != 0


def test_version():
    from moetool import __version__

    assert run("--version").stdout.strip() == f"moetool {__version__}"


def test_param_count_table_json_contract():
    rows = json.loads(run("param-count", "--table", "--json").stdout)
    assert len(rows) == 12
    for row in rows:
        assert set(row) >= TABLE8_KEYS
        assert isinstance(row["paper_total_b"], float)
        assert isinstance(row["paper_activated_b"], float)
        for key in ("formula_total", "formula_activated", "exact_total", "exact_activated"):
            assert isinstance(row[key], int) and row[key] > 1e9
        assert row["exact_activated"] <= row["exact_total"]
    names = [r["name"] for r in rows]
    assert names[0] == "StableLM-1.6B" and names[-1] == "MoE-LLaVA-7B×4-Top2†"


def test_param_count_recipe_json_and_set():
    row = json.loads(run("param-count", "qwen-1.8b/moe-4x-top2", "--json").stdout)
    assert TABLE8_KEYS | {"vision_params", "projector_params"} <= set(row)
    assert row["paper_total_b"] == 3.1
    assert row["vision_params"] > 3e8 and row["projector_params"] > 6e6
    ablation = json.loads(
        run("param-count", "recipes/qwen-1.8b/ablation-top1.toml", "--json").stdout
    )
    assert ablation["paper_total_b"] is None and ablation["top_k"] == 1
    assert ablation["exact_total"] == row["exact_total"]
    assert ablation["exact_activated"] < row["exact_activated"]
    eight = json.loads(
        run("param-count", "qwen-1.8b/moe-4x-top2", "--set", "moe.num_experts=8", "--json").stdout
    )
    assert eight["exact_total"] > row["exact_total"]
    assert eight["exact_activated"] == row["exact_activated"] + 12 * 2048 * 4


def test_param_count_rich_table():
    out = run("param-count", "tiny/llama").stdout
    assert "Exact count by component" in out and "experts" in out and "vision tower" in out
    out = run("param-count", "--table").stdout
    assert "MoE-LLaVA-1.8B×4-Top2" in out and "‡" in out


def test_param_count_config(tmp_path):
    from moetool.models.build import lvlm_config
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root

    recipe = load_recipe(recipes_root() / "tiny/phi.toml")
    lvlm_config(recipe.model, recipe.vision).save_pretrained(tmp_path)
    row = json.loads(
        run(
            "param-count",
            "--config",
            str(tmp_path / "config.json"),
            "--experts",
            "4",
            "--topk",
            "1",
            "--layers",
            "0,3",
            "--json",
        ).stdout
    )
    assert row["moe_layers"] == [0, 3] and row["num_experts"] == 4 and row["top_k"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["param-count", "no/such-recipe"], "no such recipe file"),
        (["param-count", "tiny/llama", "--set", "moe.top_k=7"], "moe.top_k"),
        (["param-count", "tiny/llama", "--set", "moe.layers=[0, 12]"], "moe.layers"),
        (["param-count"], "exactly one of"),
        (["param-count", "tiny/llama", "--experts", "4"], "--experts"),
        (["param-count", "--config", "/nonexistent/config.json"], "no such config"),
        (["recipes", "tiny/llama", "--set", "stages.pretrain.lr=-1"], "stages.pretrain.lr"),
    ],
)
def test_bad_input_gives_one_clear_error(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipes_list_and_show():
    rows = json.loads(run("recipes", "--json").stdout)
    names = {r["recipe"] for r in rows}
    assert {"qwen-1.8b/moe-4x-top2", "tiny/llama", "qwen-1.8b/strategy-a"} <= names
    assert not any(n.startswith("_") or "/_" in n for n in names)
    shown = json.loads(run("recipes", "phi2-2.7b/moe-4x-top2-384", "--json").stdout)
    assert shown["vision"]["type"] == "siglip"
    assert shown["moe_layer_indices"] == list(range(0, 32, 2))


def test_data_synth(tmp_path):
    counts = json.loads(
        run(
            "data",
            "synth",
            str(tmp_path / "d"),
            "--stage1",
            "20",
            "--stage2",
            "20",
            "--stage3",
            "20",
            "--eval-images",
            "10",
            "--json",
        ).stdout
    )
    assert counts["stage1.json"] == 20 and (tmp_path / "d/eval/pope_random.json").exists()
    again = run("data", "synth", str(tmp_path / "d"), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # The lmms-eval files are written with the rest, before OUT appears: the task configs name
    # OUT's own data, never the temporary folder they were written in.
    tasks = (tmp_path / "d/lmms/tasks/gqa.yaml").read_text()
    assert str((tmp_path / "d/lmms").resolve()) in tasks and ".tmp-" not in tasks
    assert counts["lmms/gqa"] > 0


def test_data_synth_leaves_nothing_when_a_late_file_fails(tmp_path, monkeypatch):
    """A failure while writing the lmms-eval files (the last ones) used to leave a half-built
    OUT; now OUT never appears and the temporary folder is removed."""
    from moetool.data.synth import SynthConfig
    from moetool.eval import datasets

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "write_task_yamls", disk_full)
    small = SynthConfig(seed=1, image_size=32, stage1=8, stage2=8, stage3=8, eval_images=6)
    with pytest.raises(OSError, match="No space"):
        datasets.synthesize_world(tmp_path / "d", small)
    assert list(tmp_path.iterdir()) == []


def test_deepspeed_launcher_local_rank_is_taken_as_environment(monkeypatch):
    from moetool.cli.app import _take_local_rank

    # Set first so that monkeypatch's undo removes what _take_local_rank writes (a LOCAL_RANK
    # left behind would make later lmms-eval runs in this process believe they are rank 3).
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    args = ["instruct", "tiny/llama", "--out", "runs/x", "--local_rank=3"]
    assert _take_local_rank(args) == ["instruct", "tiny/llama", "--out", "runs/x"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert _take_local_rank(["eval", "--local-rank", "5", "pope"]) == ["eval", "pope"]


def test_errors_keep_bracketed_toml_names(tmp_path):
    # "[moe]" in an error is a TOML table name, not Rich markup to be swallowed.
    recipe = tmp_path / "bad.toml"
    from moetool.recipe.paths import recipes_root

    base = recipes_root() / "tiny" / "llama.toml"
    recipe.write_text(f'extends = "{base}"\n[moe]\nnum_expertz = 8\n')
    proc = run("param-count", str(recipe), check=False)
    assert proc.returncode == 2
    assert "[moe]" in proc.stderr and "num_expertz" in proc.stderr


@pytest.mark.parametrize("library_logs", ["", "1"])
def test_routine_library_lines_are_dropped_and_real_warnings_kept(library_logs):
    code = (
        "from moetool.cli.render import quiet_libraries\n"
        "quiet_libraries()\n"
        "import os, transformers\n"
        "from deepspeed.utils import logger\n"
        "logger.warning('a warning about this run')\n"
        "print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'),\n"
        "      transformers.utils.logging.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR",)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env["MOETOOL_LIBRARY_LOGS"] = library_logs
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    output = proc.stdout + proc.stderr
    assert "a warning about this run" in output
    # DeepSpeed finds no GPU here and says so on import, unless quietened.
    assert ("Setting accelerator to CPU" in output) == (library_logs == "1")
    assert proc.stdout.splitlines()[-1] == ("None True" if library_logs else "1 False")


def test_an_attention_that_cannot_run_here_is_one_error_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks this machine's lack of a GPU")
    proc = run(
        "pretrain",
        "tiny/llama",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "model.attn_implementation=flash_attention_2",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        "error: model.attn_implementation: attention 'flash_attention_2' cannot run here: it "
        "needs a CUDA GPU (none is visible here); the flash_attn package is not installed (pip "
        "install flash-attn --no-build-isolation); it takes bf16 or fp16 only, not fp32 (set "
        "stages.pretrain.precision to bf16)"
    )
    assert not (tmp_path / "run").exists()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    meta = {"moetool": {"attn_implementation": "flash_attention_2"}}
    (checkpoint / "config.json").write_text(json.dumps(meta))
    for args in (
        ["predict", "--model", str(checkpoint), "--prompt", "Hi?"],
        ["eval", "pope", "--model", str(checkpoint), "--out", str(tmp_path / "e")],
        ["routing", "capture", "--model", str(checkpoint), "--data", "x.json"]
        + ["--out", str(tmp_path / "r")],
    ):
        proc = run(*args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, args
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(
            f"error: {checkpoint} was trained with attn_implementation 'flash_attention_2': "
            "attention 'flash_attention_2' cannot run here: it needs a CUDA GPU"
        ), args
        assert line.endswith("pass --attn-implementation sdpa (or eager) to run it with another")
    proc = run(*args, "--attn-implementation", "flash", check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --attn-implementation flash: unknown attention implementation 'flash'; known: "
        "sdpa, eager, flash_attention_2, flash_attention_3, flex_attention\n"
    )
