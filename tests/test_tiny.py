"""The built-in tiny world: presets, the offline tokenizer and the smoke form of a recipe."""

import pytest

from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import IMAGE_TOKEN, PRESETS, build_tokenizer, preset_recipe, smoke_recipe


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
