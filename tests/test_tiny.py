"""The built-in tiny world: presets, the offline tokenizer and the smoke form of a recipe."""

import pytest

from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.smoke import smoke_recipe
from moetool.tiny import IMAGE_TOKEN, PRESETS, build_tokenizer, preset_recipe


def test_presets_resolve_to_recipes():
    for name in PRESETS:
        recipe = preset_recipe(name)
        assert recipe.model.model_type
    assert preset_recipe("openchat-7b").model.num_kv_heads == 8
    with pytest.raises(KeyError, match="known: stablelm-1.6b"):
        preset_recipe("llama-70b")


def test_offline_tokenizer_is_deterministic_and_has_the_image_token():
    a = build_tokenizer(512, "chatml")
    b = build_tokenizer(512, "chatml")
    text = "Is there a red circle in the image? <image> Yes."
    assert a(text).input_ids == b(text).input_ids
    assert len(a) <= 512
    assert a.convert_tokens_to_ids(IMAGE_TOKEN) in a(text).input_ids
    assert a.decode(a(text).input_ids) == text
    assert (
        a.eos_token == "<|im_end|>"
        and build_tokenizer(512, "openchat").eos_token == "<|end_of_turn|>"
    )
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_tokenizer(512, "vicuna_v9")


def test_smoke_form_keeps_the_stage_logic():
    original = load_recipe(recipes_root() / "openchat-7b/moe-4x-top2.toml")
    smoke = smoke_recipe(original, "/data")
    assert smoke.model.model_type == "mistral" and smoke.model.num_kv_heads < smoke.model.num_heads
    assert smoke.moe == original.moe
    for name, stage in original.stages.present().items():
        small = getattr(smoke.stages, name)
        for key in (
            "trainable",
            "lr",
            "lr_schedule",
            "warmup_ratio",
            "zero_stage",
            "offload_optimizer",
            "precision",
            "template",
            "image_aspect_ratio",
        ):
            assert getattr(small, key) == getattr(stage, key), (name, key)
        assert len(small.data) == len(stage.data) and small.max_steps == 2


WHOLE_VLM_RECIPES = [
    "qwen3-vl-2b/moe-4x-top2",
    "qwen2.5-vl-3b/moe-4x-top2",
    "internvl3.5-2b/moe-4x-top2",
    "smolvlm2-2.2b/moe-4x-top2",
    "gemma3-4b/moe-4x-top2",
    "llava-onevision-0.5b/moe-4x-top2",
]


@pytest.mark.parametrize("name", WHOLE_VLM_RECIPES)
def test_smoke_form_of_a_whole_vlm_recipe_starts_from_a_saved_tiny_base(name, tmp_path):
    import json
    from pathlib import Path

    from moetool.models.arch import published_dims

    original = load_recipe(recipes_root() / f"{name}.toml")
    base = original.model.base
    smoke = smoke_recipe(original, str(tmp_path / "data"))
    checkpoint = tmp_path / f"tiny-{base}"
    assert Path(smoke.model.path) == checkpoint and Path(smoke.model.config) == (
        checkpoint / "config.json"
    )
    assert (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == base
    assert (checkpoint / "processor_config.json").is_file()  # the processor saved beside it
    # The recipe validates against the tiny config: its dims are the tiny model's.
    dims = published_dims(smoke.model.config, base)
    assert {k: getattr(smoke.model, k) for k in dims} == dims
    assert smoke.model.num_layers == 4 and smoke.model.hidden_size == 64
    assert smoke.moe == original.moe and smoke.moe_layer_indices == (0, 2)
    assert list(smoke.stages.present()) == ["moe_tune"]
    stage, small = original.stages.moe_tune, smoke.stages.moe_tune
    assert (small.trainable, small.lr, small.zero_stage) == (
        stage.trainable,
        stage.lr,
        stage.zero_stage,
    )
    assert small.max_steps == 2 and small.data == ("stage3.json",) * len(stage.data)
    # Written once, then reused.
    saved = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert smoke_recipe(original, str(tmp_path / "data")) == smoke
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == saved
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]
