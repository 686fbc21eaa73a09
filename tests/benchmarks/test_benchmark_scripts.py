"""The benchmark scripts run and print the JSON they document, and the MoE-layer benchmark's
reference implementations compute what the MoE block computes (so its timings compare equal
work)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetool.models.moe import MoEBlock, MoEConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_layer_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(bench, num_experts):
    torch.manual_seed(0)
    dense = bench.SwiGLU(16, 32)
    block = MoEBlock.upcycle(dense, 16, MoEConfig(num_experts=num_experts, top_k=2))
    torch.nn.init.normal_(block.router.weight, std=0.5)
    return dense, block


@pytest.mark.parametrize("num_experts", [4, 16])
def test_loop_reference_equals_block(bench, num_experts):
    dense, block = _pair(bench, num_experts)
    loop = bench.LoopStacked(dense, num_experts)
    loop.router.weight.data.copy_(block.router.weight)
    x = torch.randn(64, 16)
    torch.testing.assert_close(loop(x), block(x), atol=1e-5, rtol=1e-5)


def test_capacity_reference_equals_block_when_nothing_is_dropped(bench):
    dense, block = _pair(bench, 4)
    einsum = bench.CapacityEinsum(dense, 4)
    einsum.router.weight.data.copy_(block.router.weight)
    einsum.capacity_factor = 2.0  # capacity = all tokens: no drops
    x = torch.randn(64, 16)
    torch.testing.assert_close(einsum(x), block(x), atol=1e-5, rtol=1e-5)


def test_experts_alone_runs_the_blocks_routing_gave(bench):
    dense, block = _pair(bench, 4)
    x = torch.randn(64, 16)
    alone = bench.ExpertsAlone.routed(block, x)
    routed = torch.bincount(block.routing(block.router(x)).expert_index.reshape(-1), minlength=4)
    assert alone.counts == routed.tolist()
    out = alone(x)
    assert out.shape == (128, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in block.experts.parameters())


def run_json(script: str, *args: str) -> dict:
    """Run a benchmark script (environment inherited: offline) and parse what it prints."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT.parent / script), *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


TINY_LAYER = ("--d-model", "16", "--ffn", "32", "--tokens", "64", "--experts", "4", "--rounds", "2")


def test_moe_layer_script_prints_its_json():
    data = run_json("moe_layer.py", *TINY_LAYER)
    names = ["moetool_e4", "moetool_with_losses_e4", "experts_alone_e4", "loop_stacked_e4"]
    names.append("capacity_einsum_e4")
    assert set(data["ratio_to_dense"]) == set(names)
    assert data["setting"]["samples"] == 2
    assert all(value > 0 for value in data["seconds_median"].values())
    median = data["seconds_median"]
    assert data["moetool_over_experts_alone"] == {
        "e4": pytest.approx(median["moetool_e4"] / median["experts_alone_e4"])
    }


def test_expert_gemms_script_prints_its_json():
    data = run_json("expert_gemms.py", *TINY_LAYER)
    assert data["setting"]["rows_per_expert"] == 32  # top-2: 2 x 64 tokens over 4 experts
    assert set(data["ratio_to_dense"]) == {
        "gemms_experts_distinct",
        "gemms_experts_shared",
        "modules_experts_distinct",
        "modules_experts_shared",
    }
    assert all(value > 0 for value in data["seconds_median"].values())


def test_eval_throughput_script_prints_its_json():
    data = run_json(
        "eval_throughput.py", "--samples", "2", "--max-new-tokens", "2", "--rounds", "1"
    )
    for batch in ("batch_1", "batch_8"):
        assert set(data["samples_per_s"][batch]) >= {"dense", "moe", "moe_as_before"}
    block = data["moe_block_one_token_us"]
    assert block["now"] > 0 and block["as_before"] > 0


def test_block_with_losses_adds_the_models_router_losses(bench):
    from moetool.models.moe import router_losses

    _, block = _pair(bench, 4)
    x = torch.randn(64, 16)
    aux, z = router_losses([block.router(x)])
    torch.testing.assert_close(
        bench.BlockWithLosses(block)(x).sum(), block(x).sum() + 0.01 * aux + 0.001 * z
    )


@pytest.mark.integration  # torchrun, two ranks, once per start-up mode (minutes)
def test_zero3_memory_script_prints_its_json():
    data = run_json(
        "zero3_memory.py", "--layers", "2", "--hidden", "128", "--ffn", "256", "--vocab", "512"
    )
    assert len(data["results"]) == 8
    for name, result in data["results"].items():
        assert len(result["ranks"]) == 2
        # What each rank holds after the start-up: half the model, in bf16 or fp32.
        held = 0.25 if name.startswith("partitioned-bf16") else 0.5
        assert result["held_over_fp32"] == [pytest.approx(held, abs=0.02)] * 2, name


def test_data_pipeline_script_prints_its_json():
    data = run_json(
        "data_pipeline.py",
        "--batch",
        "1",
        "--steps",
        "2",
        "--step-seconds",
        "0.02",
        "--workers",
        "0",
        "1",
    )
    assert set(data["results"]) == {"num_workers=0", "num_workers=1"}
    # The samples fill max_length with the image's 576 tokens: real-size conversations.
    assert all(1400 < n <= 2048 for n in data["setting"]["tokens_per_sample"])
    for row in data["results"].values():
        assert 0 <= row["data_wait_share"] < 1 and row["step_seconds_mean"] > 0


def test_data_check_script_prints_its_json():
    data = run_json("data_check.py", "--samples", "200", "--images", "3", "--workers", "1")
    assert data["setting"]["samples"] == 200 and data["setting"]["images"] == 3
    # LLaVA-mix665k's proportions: about 6% of the samples are text-only (ShareGPT).
    assert 5 <= data["setting"]["text_only"] <= 20
    row = data["results"]["workers=1"]
    assert row["json_tokens_samples_per_s"] > 0 and row["decode_images_per_s"] > 0
    # Lengths include CLIP-L/336's 576 image tokens.
    assert data["setting"]["tokens"]["median"] > 576


@pytest.mark.integration  # builds DeepSpeed's cpu_adam op on first use (1-2 minutes)
def test_offload_step_script_prints_its_json():
    data = run_json(
        "offload_step.py", *("--hidden", "64", "--layers", "1", "--ffn", "128"),
        *("--vocab", "256", "--seq", "16", "--steps", "2"),
    )  # fmt: skip
    results = data["results"]
    assert {name: r["optimizer"] for name, r in results.items()} == {
        "torch_adamw": "AdamW",
        "deepspeed_cpu_adam": "DeepSpeedCPUAdam",
    }
    # The same start, data and updates: the same losses step after step.
    torch_losses, ds_losses = (results[n]["losses"] for n in ("torch_adamw", "deepspeed_cpu_adam"))
    assert len(torch_losses) == 3 and torch_losses[-1] < torch_losses[0]
    assert ds_losses == pytest.approx(torch_losses, abs=1e-5)
    for r in results.values():
        assert 0 < r["optimizer_step_seconds_median"] < r["step_seconds_median"]
    assert data["step_ratio_torch_over_cpu_adam"] == pytest.approx(
        results["torch_adamw"]["step_seconds_median"]
        / results["deepspeed_cpu_adam"]["step_seconds_median"]
    )


def test_packing_script_prints_its_json():
    data = run_json(
        "packing.py", *("--samples", "3000", "--timed-samples", "8", "--repeats", "1"),
        *("--hidden", "64", "--layers", "1", "--ffn", "128", "--vocab", "256"),
    )  # fmt: skip
    results = data["results"]
    assert set(results) == {"padded", "padded_grouped", "packed", "packed_block_mask"}
    # Packing computes no padding; padding does, grouping less of it; every mode the same samples.
    assert results["packed"]["processed_per_real_token"] == 1.0
    assert (
        results["padded"]["processed_per_real_token"]
        > (results["padded_grouped"]["processed_per_real_token"])
        > 1.0
    )
    timed = {r["timed_real_tokens"] for r in results.values()}
    assert len(timed) == 1
    for r in results.values():
        assert r["seconds_per_1k_real_tokens"] > 0 and len(r["rounds_seconds"]) == 1
    assert data["goal_met"] == (
        data["packed_time_per_real_token_over_grouped"] < 1
        and results["packed"]["processed_per_real_token"] <= 1.05
    )
    # Image samples carry CLIP-L/336's 576 tokens; about 6% of the mix is text-only.
    assert data["setting"]["median_length"] > 576
