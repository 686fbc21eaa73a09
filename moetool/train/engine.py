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


def micro_batch_plan(global_batch: int, per_device: int, world: int) -> tuple[int, int]:
    """The per-device batch and gradient accumulation steps that make ``global_batch`` on
    ``world`` ranks (per-device x world x accumulation = global): the recipe's ``per_device``
    when ``per_device x world`` divides the global batch, else the largest smaller per-device
    batch that does. A ``TrainingError`` only when none exists (``world`` does not divide
    ``global_batch``), naming the world sizes that do."""
    if global_batch % world:
        valid = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        lower = global_batch // world * world
        nearest = f"{lower} or {lower + world}" if lower else str(world)
        raise TrainingError(
            f"global_batch_size {global_batch} cannot be split evenly over {world} ranks: run "
            f"on a world size that divides it ({', '.join(map(str, valid))}) or set it to a "
            f"multiple of {world} (e.g. {nearest})"
        )
    per_rank = global_batch // world  # samples each rank trains on per optimizer step
    used = max(d for d in range(1, min(per_device, per_rank) + 1) if per_rank % d == 0)
    return used, per_rank // used


def batch_plan_note(stage_name: str, stage: StageSection, world: int) -> str | None:
    """One line saying how the stage's global batch is made when the recipe's per-device batch
    had to change for this world size; None when it did not."""
    used, accumulation = micro_batch_plan(
        stage.global_batch_size, stage.per_device_batch_size, world
    )
    if used == stage.per_device_batch_size:
        return None
    return (
        f"stages.{stage_name}: per_device_batch_size {stage.per_device_batch_size} x {world} "
        f"ranks does not divide global_batch_size {stage.global_batch_size}; using "
        f"{used} per device x {world} ranks x {accumulation} accumulation "
        f"step{'s' if accumulation > 1 else ''} = {stage.global_batch_size}"
    )


def deepspeed_config(stage: StageSection, world_size: int, pin_memory: bool = False) -> dict:
    """The DeepSpeed config of ``stage`` on ``world_size`` ranks (its micro-batch from
    ``micro_batch_plan``). With ``offload_optimizer`` the optimizer states live on the CPU,
    stepped by DeepSpeed's CPU Adam (``build_optimizer``); ``pin_memory`` where CUDA copies
    them."""
    per_device, accumulation = micro_batch_plan(
        stage.global_batch_size, stage.per_device_batch_size, world_size
    )
    zero: dict = {"stage": stage.zero_stage}
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": per_device,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, as the official scripts


def build_optimizer(stage: StageSection, params: list):
    """AdamW over ``params`` with the stage's lr and weight decay: torch's, or with
    ``offload_optimizer`` DeepSpeed's vectorised CPU Adam (AdamW mode), which steps the
    offloaded fp32 states on the CPU (JIT-built on first use, cached under
    ~/.cache/torch_extensions)."""
    import torch

    if stage.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            params,
            lr=stage.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=stage.weight_decay,
            adamw_mode=True,
        )
    return torch.optim.AdamW(
        params, lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=stage.weight_decay
    )


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
