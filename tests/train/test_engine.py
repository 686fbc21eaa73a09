"""DeepSpeed set-up of a stage: its config, the learning-rate schedule and the stage's dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetool.recipe import load_recipe
from moetool.recipe.paths import bundled_recipes, recipes_root
from moetool.recipe.schema import StageSection
from moetool.train.engine import (
    TrainingError,
    batch_plan_note,
    build_optimizer,
    deepspeed_config,
    lr_lambda,
    micro_batch_plan,
    stage_dtype,
)

STAGE = StageSection(
    data=("x.json",),
    trainable=("llm",),
    global_batch_size=32,
    per_device_batch_size=4,
    lr=2e-5,
)


def test_cosine_schedule_golden_values():
    # 10 steps, 2 of warmup: 1/2 and 2/2 of the peak, then half a cosine period down to 0.
    factor = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == 1.0
    assert factor(6) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert factor(4) == pytest.approx(0.853553, abs=1e-6)
    assert factor(10) == pytest.approx(0.0)


def test_linear_and_constant_schedules():
    linear = lr_lambda("linear", warmup_steps=0, total_steps=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    constant = lr_lambda("constant", warmup_steps=3, total_steps=4)
    assert [constant(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    # Warmup as long as the run: the peak is held after it.
    assert lr_lambda("cosine", warmup_steps=5, total_steps=5)(7) == 1.0


def test_deepspeed_config_accumulates_to_the_global_batch():
    config = deepspeed_config(STAGE, world_size=2)
    # 32 = 4 per device x 2 ranks x 4 accumulation steps.
    assert config["train_batch_size"] == 32
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == STAGE.max_grad_norm


def test_deepspeed_config_offload_and_precision():
    stage = dataclasses.replace(STAGE, zero_stage=3, offload_optimizer=True, precision="fp16")
    config = deepspeed_config(stage, world_size=8)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu",
        "pin_memory": False,
    }
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    assert config["gradient_accumulation_steps"] == 1
    # DeepSpeed's guard stays on: an offloaded run that is not handed CPU Adam is refused.
    assert "zero_force_ds_cpu_optimizer" not in config
    pinned = deepspeed_config(stage, world_size=8, pin_memory=True)
    assert pinned["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


@pytest.mark.parametrize(
    ("global_batch", "per_device", "world", "plan"),
    [
        (256, 32, 16, (16, 1)),  # stage I on 16 GPUs: 32 x 16 = 512 > 256
        (256, 32, 8, (32, 1)),  # the recipe's own: kept
        (256, 32, 1, (32, 8)),
        (128, 16, 16, (8, 1)),
        (128, 16, 2, (16, 4)),
        (12, 4, 2, (3, 2)),  # 4 x 2 does not divide 12: 3 per device, 2 accumulation steps
        (96, 32, 3, (32, 1)),
        (100, 32, 4, (25, 1)),
        (7, 4, 7, (1, 1)),
    ],
)
def test_micro_batch_plan_golden_values(global_batch, per_device, world, plan):
    assert micro_batch_plan(global_batch, per_device, world) == plan


def test_a_global_batch_the_world_does_not_divide_is_refused_naming_the_valid_sizes():
    with pytest.raises(TrainingError) as err:
        micro_batch_plan(32, 4, 3)
    assert str(err.value) == (
        "global_batch_size 32 cannot be split evenly over 3 ranks: run on a world size that "
        "divides it (1, 2, 4, 8, 16, 32) or set it to a multiple of 3 (e.g. 30 or 33)"
    )
    with pytest.raises(TrainingError, match="cannot be split evenly over 3 ranks"):
        deepspeed_config(STAGE, world_size=3)
    with pytest.raises(TrainingError, match=r"multiple of 8 \(e.g. 8\)"):
        micro_batch_plan(4, 2, 8)


STAGES = [
    (name, stage_name, stage)
    for name in bundled_recipes()
    for stage_name, stage in vars(load_recipe(recipes_root() / f"{name}.toml").stages).items()
    if isinstance(stage, StageSection)
]


@pytest.mark.parametrize(
    ("name", "stage_name", "stage"), STAGES, ids=[f"{n}:{s}" for n, s, _ in STAGES]
)
def test_every_bundled_stage_plans_for_world_sizes_1_to_16(name, stage_name, stage):
    """Each world size 1-16 keeps the recipe's global batch with the largest per-device batch
    up to the recipe's, or is refused exactly when it does not divide the global batch."""
    g, pd = stage.global_batch_size, stage.per_device_batch_size
    planned = []
    for world in range(1, 17):
        if g % world:
            with pytest.raises(TrainingError, match=f"over {world} ranks"):
                micro_batch_plan(g, pd, world)
            continue
        used, accumulation = micro_batch_plan(g, pd, world)
        assert used * world * accumulation == g
        assert 1 <= used <= pd
        assert not any(g % (larger * world) == 0 for larger in range(used + 1, pd + 1))
        config = deepspeed_config(stage, world)
        assert config["train_batch_size"] == g
        assert config["train_micro_batch_size_per_gpu"] == used
        assert config["gradient_accumulation_steps"] == accumulation
        planned.append(world)
    if not name.startswith("tiny/"):  # the paper's batches (256, 128) on 1-16 GPUs of a node
        assert {1, 2, 4, 8, 16} <= set(planned)


def test_the_start_line_says_when_the_per_device_batch_changes():
    stage = dataclasses.replace(STAGE, global_batch_size=256, per_device_batch_size=32)
    assert batch_plan_note("pretrain", stage, 8) is None
    assert batch_plan_note("pretrain", stage, 16) == (
        "stages.pretrain: per_device_batch_size 32 x 16 ranks does not divide "
        "global_batch_size 256; using 16 per device x 16 ranks x 1 accumulation step = 256"
    )
    small = dataclasses.replace(STAGE, global_batch_size=12, per_device_batch_size=4)
    assert batch_plan_note("instruct", small, 2).endswith(
        "using 3 per device x 2 ranks x 2 accumulation steps = 12"
    )


def test_optimizer_without_offload_is_torch_adamw_with_the_stage_hyperparameters():
    stage = dataclasses.replace(STAGE, weight_decay=0.1)
    optimizer = build_optimizer(stage, [torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        2e-5,
        0.1,
        (0.9, 0.999),
        1e-8,
    )


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)],
)
def test_stage_dtype(precision, dtype):
    assert stage_dtype(dataclasses.replace(STAGE, precision=precision)) is dtype
