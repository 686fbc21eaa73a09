"""The lmms-eval plugin prepares inputs as training did."""

import types

from PIL import Image

from moetool.eval.lmms_model import build_prompt, prepare_image, training_aspect_ratio
from moetool.models.build import build_processor
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_tokenizer


def test_images_are_padded_like_training():
    recipe = load_recipe(recipes_root() / "tiny/llama.toml")
    processor = build_processor(recipe.vision, build_tokenizer(512, "llama3"))
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    padded = prepare_image(wide, processor, "pad")
    assert padded.size == (60, 60) and padded.getpixel((0, 0)) != (255, 0, 0)
    assert prepare_image(wide, processor, "resize").size == (60, 20)


def test_aspect_ratio_comes_from_the_last_trained_stage():
    config = types.SimpleNamespace(
        moetool={
            "stage": "moe_tune",
            "recipe": {
                "stages": {
                    "pretrain": {"image_aspect_ratio": "resize"},
                    "moe_tune": {"image_aspect_ratio": "pad"},
                }
            },
        }
    )
    assert training_aspect_ratio(config) == "pad"
    config.moetool["stage"] = "pretrain"
    assert training_aspect_ratio(config) == "resize"
    assert training_aspect_ratio(types.SimpleNamespace()) == "pad"


def test_prompt_uses_the_chat_template_with_one_image_token_per_image():
    from moetool.data.templates import get_template

    tokenizer = build_tokenizer(512, "qwen")
    tokenizer.chat_template = get_template("qwen").jinja()
    prompt = build_prompt(tokenizer, "Is there a red circle?", 1)
    assert prompt == get_template("qwen").prompt("<image>\nIs there a red circle?")
    assert prompt.count("<image>") == 1
