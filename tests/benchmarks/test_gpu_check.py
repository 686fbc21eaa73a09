"""scripts/gpu-check, the one-run GPU measurement: its --dry-run takes the same code paths on a
CPU at toy size and prints every part's figures; a failing part is recorded while the others run;
the budget skips the parts not yet started."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"
STAGE_KEYS = {
    "steps",
    "steps_timed",
    "tokens_per_s_median",
    "tokens_per_s_mean",
    "loss_first",
    "loss_last",
    "seconds",
    "memory_allocated_at_start_mib",
    "peak_memory_allocated_mib",
    "peak_memory_reserved_mib",
}


def gpu_check(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # stdout carries the JSON alone
    assert json.loads(out.read_text()) == printed
    return proc.returncode, printed


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_stage(stage: dict, steps: int) -> None:
    assert set(stage) == STAGE_KEYS
    assert stage["steps"] == steps and stage["steps_timed"] == steps - 1  # step 1: warm-up
    for key in ("tokens_per_s_median", "tokens_per_s_mean", "loss_first", "loss_last"):
        assert positive(stage[key]), (key, stage[key])
    assert stage["peak_memory_allocated_mib"] is None  # no GPU in a dry run


def check_moe_block(part: dict) -> None:
    assert part["setting"]["dtype"] == "float32" and part["setting"]["d_model"] == 64
    assert "= 512" in part["setting"]["dense_equal_flops"]  # top-2 x FFN 256
    assert set(part["ms_median"]) == {
        f"{name}_e{e}"
        for e in (4, 16)
        for name in ("dense_equal_flops_with", "moetool", "experts_alone")
    }
    assert all(positive(v) for v in part["ms_median"].values())
    for key in ("moetool_over_dense_equal_flops", "moetool_over_experts_alone"):
        assert set(part[key]) == {"e4", "e16"} and all(positive(v) for v in part[key].values())
    ms = part["ms_median"]
    assert part["moetool_over_dense_equal_flops"]["e4"] == pytest.approx(
        ms["moetool_e4"] / ms["dense_equal_flops_with_e4"], rel=1e-2
    )


@pytest.mark.integration
def test_the_dry_run_reports_every_part(tmp_path):
    code, data = gpu_check(tmp_path, "--attn", "sdpa", "--attn", "flash_attention_2")
    assert code == 0, json.dumps(data, indent=1)
    assert data["dry_run"] is True
    assert data["settings"]["device"] == "cpu" and data["settings"]["precision"] == "fp32"
    assert data["settings"]["global_batch_size"] == 8
    env = data["environment"]
    assert {"torch", "transformers", "deepspeed", "flash_attn", "cuda_available"} <= set(env)
    assert env["cuda_available"] is False
    stages = data["stages"]["sdpa"]
    for name in ("pretrain", "instruct", "moe_tune"):
        check_stage(stages[name], 3)
    flash = data["stages"]["flash_attention_2"]
    if not env["flash_attn"]["importable"]:
        assert flash["skipped"] == "flash_attn not installed"
    packing = data["packing"]
    check_stage(packing["padded"], 3)
    check_stage(packing["packed"], 3)
    # Packing changes the layout, not the sums: the same losses.
    assert packing["packed"]["loss_last"] == pytest.approx(packing["padded"]["loss_last"], 1e-4)
    assert positive(packing["packed_over_padded_tokens_per_s"])
    lora = data["lora"]  # stage III with adapters from the sdpa run's stage II checkpoint
    for name in ("lora", "qlora"):
        check_stage(lora[name], 3)
        assert positive(lora[f"{name}_over_full_tokens_per_s"])
    check_moe_block(data["moe_block"])
    assert data["budget"] == {"budget_s": 420.0, "exceeded": False, "skipped_parts": []}
    assert positive(data["seconds_total"])


def test_a_failing_stage_is_recorded_and_the_other_parts_still_run(tmp_path):
    code, data = gpu_check(tmp_path, "--set", 'stages.pretrain.data=["missing.json"]')
    assert code == 1
    stages = data["stages"]["sdpa"]
    assert "missing.json" in stages["pretrain"]["error"]
    assert stages["instruct"] == stages["moe_tune"] == {"skipped": "stage pretrain failed"}
    assert "missing.json" in data["packing"]["error"]  # it trains its own stage I: the same
    assert data["lora"]["skipped"] == "the sdpa stages left no stage II checkpoint"
    check_moe_block(data["moe_block"])
    assert data["environment"]["torch"]


def test_parts_not_started_within_the_budget_are_skipped(tmp_path):
    code, data = gpu_check(tmp_path, "--budget-s", "0")
    assert code == 0
    assert data["budget"]["exceeded"] is True
    skipped = ["environment", "stages.sdpa", "packing", "lora", "moe_block"]
    assert data["budget"]["skipped_parts"] == skipped
    for part in (data["environment"], data["stages"]["sdpa"], data["packing"], data["moe_block"],
                 data["lora"]):  # fmt: skip
        assert part["skipped"].startswith("budget of 0 s spent")


def test_without_cuda_it_says_so_in_the_json(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "--dry-run" in data["error"] and data["environment"]["cuda_available"] is False
