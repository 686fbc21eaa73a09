"""The smoke form of a recipe, for CI: the same stages, trainable parts, schedules, ZeRO settings,
MoE layout and templates, at tiny dims with a few steps on synthetic data, so that every bundled
recipe's stage logic runs on a CPU. A whole-VLM recipe starts from a tiny random model of its base
(``moetool.tiny_vlm``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from moetool.models.arch import PUBLISHED_DIMS
from moetool.recipe.load import recipe_from_dict, recipe_to_dict
from moetool.recipe.schema import Recipe

# Config kwargs that do not depend on model size are kept; size-bound ones are replaced.
_SIZE_BOUND_EXTRA = ("max_position_embeddings", "head_dim", "sliding_window")
_STAGE_DATA = {"pretrain": "stage1.json", "instruct": "stage2.json", "moe_tune": "stage3.json"}


def smoke_recipe(recipe: Recipe, data_root: str, max_steps: int = 2) -> Recipe:
    """The tiny version of ``recipe`` reading the synthetic data in ``data_root``. A whole-VLM
    recipe starts from a tiny random model of its base, saved once next to ``data_root``."""
    data = recipe_to_dict(recipe)
    model = data["model"]
    if recipe.model.base:
        checkpoint = tiny_base_checkpoint(recipe.model.base, Path(data_root).parent)
        for key in PUBLISHED_DIMS:  # refilled from the tiny model's config
            model.pop(key, None)
        model.update(path=str(checkpoint), config=str(checkpoint / "config.json"))
    else:
        grouped = model["num_kv_heads"] < model["num_heads"]
        extra = {k: v for k, v in model.get("extra", {}).items() if k not in _SIZE_BOUND_EXTRA}
        extra["max_position_embeddings"] = 1024
        model.update(
            vocab_size=512,
            hidden_size=64,
            num_layers=4,
            ffn_hidden_size=128,
            num_heads=4,
            num_kv_heads=2 if grouped else 4,
            path="",
            extra=extra,
        )
        data["vision"].update(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=2,
            intermediate_size=64,
            num_heads=2,
            path="",
        )
    data["data"].update(root=data_root, image_folder=data_root)
    for name, stage in data["stages"].items():
        stage.update(
            data=[_STAGE_DATA[name]] * len(stage["data"]),
            max_steps=max_steps,
            per_device_batch_size=1,
            global_batch_size=2,
            max_length=256,
            gradient_checkpointing=stage["gradient_checkpointing"],
            save_steps=0,
        )
    data["name"] = f"{recipe.name} (smoke)"
    return recipe_from_dict(data, f"smoke form of {recipe.name}")


def tiny_base_checkpoint(base: str, folder: str | Path) -> Path:
    """``folder/tiny-<base>``: the tiny random dense VLM of ``base`` (4 decoder layers, seed 0)
    and its processor, saved with ``save_pretrained``; written once, then reused."""
    checkpoint = Path(folder) / f"tiny-{base}"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    from moetool.tiny_vlm import build_random_vlm

    vlm, processor = build_random_vlm(base, seed=0, num_layers=4)
    partial = checkpoint.with_name(f"{checkpoint.name}.partial-{os.getpid()}")
    vlm.save_pretrained(partial)
    processor.save_pretrained(partial)
    try:
        partial.rename(checkpoint)  # complete or absent, for a process that looks meanwhile
    except OSError:  # another process saved it first
        shutil.rmtree(partial, ignore_errors=True)
    return checkpoint
