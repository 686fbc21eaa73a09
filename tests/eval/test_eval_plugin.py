"""The lmms-eval plugin prepares inputs as training did."""

import types

from moetool.eval.lmms_model import build_prompt, training_aspect_ratio
from moetool.tiny import build_tokenizer


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
