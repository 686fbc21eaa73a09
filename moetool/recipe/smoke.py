"""Smoke form of a recipe: the same stages, trainable parts, schedules, ZeRO settings, MoE
layout and templates, at tiny dims with a few steps on synthetic data — so that CI runs every
bundled recipe's stage logic on a CPU."""

from __future__ import annotations

from moetool.recipe.load import recipe_from_dict, recipe_to_dict
from moetool.recipe.schema import Recipe

# Config kwargs that do not depend on model size are kept; size-bound ones are replaced.
_SIZE_BOUND_EXTRA = ("max_position_embeddings", "head_dim", "sliding_window")
_STAGE_DATA = {"pretrain": "stage1.json", "instruct": "stage2.json", "moe_tune": "stage3.json"}


def smoke_recipe(recipe: Recipe, data_root: str, max_steps: int = 2) -> Recipe:
    """The tiny version of ``recipe`` reading the synthetic data in ``data_root``."""
    data = recipe_to_dict(recipe)
    model = data["model"]
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
