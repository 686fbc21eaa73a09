"""Tiny random dense VLMs of real transformers architectures, with offline processors."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from moetool.tiny_vlm import BASES, build_random_vlm, image_placeholder, vlm_inputs

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}
CHATML = "<|im_start|>assistant\n"
# What add_generation_prompt appends; Mistral has none (the answer follows [/INST]).
GENERATION_PROMPT = {
    "llava": "ASSISTANT:",
    "llava_next": "ASSISTANT:",
    "llava_onevision": CHATML,
    "qwen2_vl": CHATML,
    "qwen2_5_vl": CHATML,
    "qwen3_vl": CHATML,
    "internvl": CHATML,
    "idefics3": "Assistant:",
    "smolvlm": "Assistant:",
    "gemma3": "<start_of_turn>model\n",
    "mistral3": "",
}
PROMPTS = ["describe the image", "what colour is the big shape in the middle?"]
NUM_LAYERS = 2


def test_the_bases_are_the_tested_ones():
    assert set(BASES) == set(MODEL_CLASSES) == set(GENERATION_PROMPT)


def images() -> list[Image.Image]:
    """Two images of different sizes (height x width 40x70 and 32x32)."""
    rng = np.random.RandomState(0)
    return [
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 70), (32, 32))
    ]


@functools.cache
def built(base: str):
    return build_random_vlm(base, num_layers=NUM_LAYERS)


@pytest.mark.parametrize("base", BASES)
def test_model_is_the_base_at_tiny_size(base):
    model, processor = built(base)
    assert type(model).__name__ == MODEL_CLASSES[base]
    assert model.config.model_type == base and not model.training
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, NUM_LAYERS)
    assert text.vocab_size == len(processor.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("base", BASES)
def test_processor_inputs_give_a_finite_loss(base):
    model, processor = built(base)
    inputs = vlm_inputs(processor, images(), PROMPTS)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # padded on the left
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(-1)
    assert (image_tokens > 0).all()
    # The forward raises unless each image's features fill exactly its image tokens.
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    # The image reaches the language model (a zero-initialised projection would hide it).
    changed = dict(inputs, pixel_values=inputs["pixel_values"] + 0.5)
    with torch.no_grad():
        assert not torch.allclose(model(**changed).logits, out.logits)


@pytest.mark.parametrize("base", BASES)
def test_chat_template_renders_an_image_turn(base):
    model, processor = built(base)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without = processor.apply_chat_template(messages, tokenize=False)
    assert image_placeholder(base) in prompt and PROMPTS[0] in prompt
    assert prompt == without + GENERATION_PROMPT[base]
    assert prompt.endswith(GENERATION_PROMPT[base] or "[/INST]")
    assert processor.tokenizer.chat_template == processor.chat_template
    # String contents and an assistant turn.
    turns = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and the colour?"},
    ]
    chat = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert all(turn["content"] in chat for turn in turns)
    # The rendered prompt is one the processor and the model accept.
    inputs = processor(images=[images()[:1]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("base", BASES)
def test_save_and_reload_give_identical_logits(base, tmp_path):
    model, processor = built(base)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reprocessor) is type(processor)
    assert reprocessor.chat_template == processor.chat_template
    inputs = vlm_inputs(processor, images(), PROMPTS)
    again = vlm_inputs(reprocessor, images(), PROMPTS)
    assert inputs.keys() == again.keys()
    assert all(torch.equal(inputs[key], again[key]) for key in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**again).logits)


@pytest.mark.parametrize("base", BASES)
def test_the_seed_fixes_the_weights(base):
    weights = built(base)[0].state_dict()
    same = build_random_vlm(base, seed=0, num_layers=NUM_LAYERS)[0].state_dict()
    other = build_random_vlm(base, seed=1, num_layers=NUM_LAYERS)[0].state_dict()
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    drawn = [k for k, w in weights.items() if w.unique().numel() > 1]  # not filled with a constant
    assert drawn and all(not torch.equal(weights[k], other[k]) for k in drawn)


def test_unknown_base_lists_the_known_ones():
    with pytest.raises(KeyError, match="known: llava, llava_next"):
        build_random_vlm("llava_13b")
    with pytest.raises(KeyError, match="known: llava"):
        image_placeholder("qwen")


def test_default_sizes_are_unchanged():
    """The tests' tiny sizes (golden values): text width 64, M-RoPE sections of head_dim 16."""
    sections = {"qwen2_vl": [2, 3, 3], "qwen2_5_vl": [2, 3, 3], "qwen3_vl": [4, 2, 2]}
    for base, section in sections.items():
        config = built(base)[0].config
        assert config.text_config.rope_parameters["mrope_section"] == section
        vision = config.vision_config
        merged = vision.hidden_size if base == "qwen2_vl" else vision.out_hidden_size
        assert merged == config.text_config.hidden_size == 64
    assert len(built("qwen3_vl")[1].tokenizer) == 512 + 4  # the BPE plus Qwen's special tokens


@pytest.mark.parametrize("base", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "smolvlm"])
def test_larger_sizes_carry_through_to_the_connector_and_m_rope(base):
    """The quickstart's sizes: a wider text model with a wider initialisation, a larger
    vocabulary and vision encoder; the connector feeds the new width and M-RoPE's sections
    cover the new head_dim's rotary half."""
    text = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
    text |= {"num_attention_heads": 4, "num_key_value_heads": 4, "initializer_range": 0.08}
    # The base's own vision config keys: Qwen2-VL's ViT width is embed_dim (its hidden_size is
    # the merger's output).
    width = "embed_dim" if base == "qwen2_vl" else "hidden_size"
    vision = {width: 64}
    model, processor = build_random_vlm(
        base, num_layers=2, vocab_size=1024, text=text, vision=vision
    )
    config = model.config
    assert config.text_config.hidden_size == 128 and config.text_config.initializer_range == 0.08
    assert getattr(config.vision_config, width) == 64
    assert config.text_config.vocab_size == len(processor.tokenizer) >= 1024
    if base.startswith("qwen"):
        assert sum(config.text_config.rope_parameters["mrope_section"]) == 32 // 2
    embed = model.get_input_embeddings().weight
    assert 0.07 < embed.std().item() < 0.09
    inputs = vlm_inputs(processor, images(), PROMPTS)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
