"""DeepSpeed for a stage: its config, the learning-rate schedule, the stage's dtype, partitioned
(ZeRO-3) loading, activation checkpointing and gathering the whole state for the final save."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from moetool.recipe.schema import StageSection


class TrainingError(RuntimeError):
    pass


def enable_activation_checkpointing(model, reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing of every decoder layer (non-reentrant unless asked),
    through transformers' ``activation_checkpointing_enable`` where it exists; the older name,
    ``gradient_checkpointing_enable``, warns that it goes in transformers v6. The sparse model
    gives the same loss and gradients either way."""
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable(activation_checkpointing_kwargs=kwargs)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(stage: StageSection, world_size: int) -> dict:
    per_step = stage.per_device_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise TrainingError(
            f"global_batch_size {stage.global_batch_size} is not a multiple of per-device batch "
            f"{stage.per_device_batch_size} x world size {world_size}"
        )
    zero: dict = {"stage": stage.zero_stage}
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.per_device_batch_size,
        "gradient_accumulation_steps": stage.global_batch_size // per_step,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also runs on offloaded states
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stage_dtype(stage: StageSection):
    """The torch dtype of the stage's ``precision``: what it loads and saves in."""
    import torch

    return getattr(torch, PRECISION_DTYPES[stage.precision])


@contextlib.contextmanager
def partitioned_loading(ds_config: dict) -> Iterator[None]:
    """Under ZeRO-3, models that ``from_pretrained`` builds in the block are created partitioned
    over the ranks (transformers' DeepSpeed integration: ``HfDeepSpeedConfig`` makes it use
    ``deepspeed.zero.Init``; only rank 0 reads the weights), so no rank ever holds the whole
    model. The setting is process-wide in transformers: it is undone when the block ends (a
    quickstart runs every stage in one process)."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    held = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference: hold it
    try:
        yield
    finally:
        del held
        unset_hf_deepspeed_config()


def full_state_dict(module, dtype, rank: int, partitioned: bool) -> dict:
    """``module``'s whole state on rank 0 (an empty dict elsewhere), floating-point tensors in
    ``dtype``. Under ZeRO-3 (``partitioned``) the weights are gathered one submodule at a time
    with ``deepspeed.zero.GatheredParameters``; every rank must call it."""
    import torch

    def cast(t, copy: bool = False):
        return t.detach().to("cpu", dtype, copy=copy) if t.is_floating_point() else t.detach()

    gathered: dict[int, torch.Tensor] = {}
    if partitioned:
        import deepspeed

        for sub in module.modules():
            params = list(sub.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:  # a copy: the gathered storage is released when the block ends
                    gathered.update((id(p), cast(p, copy=True)) for p in params)
    if rank != 0:
        return {}
    return {
        k: gathered[id(v)] if id(v) in gathered else cast(v)
        for k, v in module.state_dict(keep_vars=True).items()
    }
