"""DeepSpeed set-up of a stage: its config, the learning-rate schedule and the stage's dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetool.recipe.schema import StageSection
from moetool.train.engine import TrainingError, deepspeed_config, lr_lambda, stage_dtype

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
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    assert config["gradient_accumulation_steps"] == 1


def test_a_global_batch_the_ranks_cannot_fill_is_refused():
    with pytest.raises(TrainingError, match="global_batch_size 32 is not a multiple"):
        deepspeed_config(STAGE, world_size=3)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)],
)
def test_stage_dtype(precision, dtype):
    assert stage_dtype(dataclasses.replace(STAGE, precision=precision)) is dtype
