"""A stage's starting point: the checkpoint it starts from by default, and the model it loads
from there (the parts of a real base, a random tiny model, or the previous stage's checkpoint,
upcycled on the fly for stage III), in the stage's precision."""

from __future__ import annotations

import json
from pathlib import Path

from moetool.models.attention import AttentionUnavailable, check_attn_implementation
from moetool.models.bases import is_sparse_model_type
from moetool.recipe.schema import Recipe, StageSection
from moetool.train.engine import TrainingError, stage_dtype

# The stages a stage starts from by default, nearest first.
STAGE_INPUTS = {"pretrain": (), "instruct": ("pretrain",), "moe_tune": ("instruct", "pretrain")}


def default_init(run_dir: Path, stage: str, recipe: Recipe) -> Path | None:
    """The checkpoint a stage starts from: the previous stage's output in the same run."""
    for previous in STAGE_INPUTS[stage]:
        if getattr(recipe.stages, previous) is not None:
            return run_dir / previous
    return None


def training_device() -> str:
    """Where a stage trains: DeepSpeed's CUDA accelerator when a GPU is visible, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_stage_attention(recipe: Recipe, stage_name: str) -> None:
    """A ``TrainingError`` naming ``model.attn_implementation`` when it cannot train the stage
    here (no GPU or flash-attn package for the flash backends, an fp32 stage, …)."""
    stage: StageSection = getattr(recipe.stages, stage_name)
    try:
        check_attn_implementation(
            recipe.model.attn_implementation,
            training_device(),
            stage.precision,
            training=True,
            dtype_key=f"stages.{stage_name}.precision",
        )
    except AttentionUnavailable as err:
        raise TrainingError(f"model.attn_implementation: {err}") from None


def check_whole_vlm_stage(recipe: Recipe, stage_name: str, init: Path | None) -> None:
    """A ``TrainingError`` for what a whole-VLM recipe (``model.base``) cannot do: start a stage
    without a local checkpoint (``model.path``, or the previous stage's), or pack samples (the
    bases' own position ids, e.g. Qwen-VL's M-RoPE, span a whole row)."""
    stage: StageSection = getattr(recipe.stages, stage_name)
    if stage.packing:
        raise TrainingError(
            f"stages.{stage_name}.packing: packing is for the LLaVA layout; a whole VLM "
            f"({recipe.model.base}) trains on padded batches"
        )
    if init is None and not Path(recipe.model.path or "").joinpath("config.json").is_file():
        raise TrainingError(
            f"model.path: {recipe.model.path!r} is not a local checkpoint directory of the "
            f"{recipe.model.base} model to start from (download it first, e.g. "
            "`hf download REPO --local-dir DIR`)"
        )


def load_start_model(recipe: Recipe, stage_name: str, init: Path | None, work: Path):
    """The stage's starting model and processor, in the stage's precision (a bf16 stage never
    materialises fp32 weights), the tower and the LM attending with ``model.attn_implementation``;
    partitioned when called under ``partitioned_loading``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import is_deepspeed_zero3_enabled

    from moetool.models.build import build_lvlm_from_parts
    from moetool.models.registration import register
    from moetool.tiny import build_random_lvlm

    register()  # the sparse model type, for the Auto classes

    stage: StageSection = getattr(recipe.stages, stage_name)
    dtype = stage_dtype(stage)
    attention = recipe.model.attn_implementation
    if init is None:
        if stage_name != "pretrain":
            raise TrainingError(f"stage {stage_name} needs a checkpoint to start from (--init)")
        if recipe.model.path:
            return build_lvlm_from_parts(recipe.model, recipe.vision, dtype=dtype)
        model, processor = build_random_lvlm(recipe, seed=stage.seed)  # with model.attn_…
        return model.to(dtype), processor
    if not (init / "config.json").is_file():
        raise TrainingError(f"--init {init}: not a checkpoint directory (no config.json)")
    config = json.loads((init / "config.json").read_text())
    sparse = is_sparse_model_type(config.get("model_type"))
    if stage_name == "moe_tune" and recipe.moe is not None and not sparse:
        # Upcycle on the fly from the recipe's [moe] section (exact copies of the FFNs).
        from moetool.upcycle import upcycle_checkpoint

        target = work / "upcycled"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:  # one process writes, the others wait for it
            upcycle_checkpoint(init, target, recipe.moe, seed=stage.seed, overwrite=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        init = target
    quantized = {}
    lora = recipe.lora_for(stage_name)
    if lora is not None and lora.quantize != "none":  # QLoRA: the frozen LM weights in 4/8 bits
        from moetool.models.lora import quantization_config

        quantized["quantization_config"] = quantization_config(lora, dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        init, dtype=dtype, attn_implementation=attention, **quantized
    )
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and is_deepspeed_zero3_enabled():
        # transformers (5.24)'s ZeRO-3 load keeps every key renaming it tried, where its whole-
        # model load keeps only those that matched; save_pretrained reverses them all and would
        # write doubled prefixes (language_model.model.model.*). Keep the used ones, as the
        # whole-model load does (the ZeRO-3 training test compares the saved key names).
        model._weight_conversions = [c for c in conversions if c.was_used()]
    return model, AutoProcessor.from_pretrained(init)
