"""Tiny random dense vision-language models of real transformers architectures, each with a
processor built offline, for tests, CI and the quickstart.

Every base is an exact transformers ``model_type``: its real config class at tiny size (text:
hidden 64, 4 heads and 2 KV heads of 16; vision: width 32, 2 layers), and its own processor with
its own image processor sized for images of a few dozen pixels (and its video processor where
the processor class requires one). The tokenizer is moetool's offline BPE tokenizer
(``moetool.tiny.build_tokenizer``) extended with the family's special tokens, named as the
family's processor reads them; every processor carries a chat template in the family's format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.tiny import build_tokenizer

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

BASE_VOCAB_SIZE = 512  # the offline BPE tokenizer's size before the family's special tokens
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}
VIT = {  # field names of the CLIP/SigLIP-style vision configs
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres grids of 32-pixel tiles
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ROW_COL_TAGS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


# Chat templates in each family's format. A message's content is a string or a list of
# {"type": "image"} and {"type": "text", "text": ...} parts.
def _content(image: str) -> str:
    return (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        f"{{% if p['type'] == 'image' %}}{image}{{% elif p['type'] == 'text' %}}"
        "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


def _chatml(image: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        f"{_content(image)}<|im_end|>\n{{% endfor %}}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _vicuna() -> str:
    return (
        "{% for m in messages %}{{ m['role'] | upper }}: "
        + _content("<image>\n")
        + "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def _idefics(start: str) -> str:
    # "User:<image>..." after an image, "User: ..." before text, as the released templates write.
    return (
        start + "{% for m in messages %}{{ m['role'] | capitalize }}:"
        "{% if m['content'] is string or m['content'][0]['type'] != 'image' %} {% endif %}"
        + _content("<image>")
        + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )


def _gemma() -> str:
    return (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        + _content("<start_of_image>")
        + "<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )


def _mistral() -> str:
    # No assistant header: the answer follows [/INST], so the generation prompt adds nothing.
    return (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
        + _content("[IMG]")
        + "[/INST]{% else %}"
        + _content("[IMG]")
        + "{{ eos_token }}{% endif %}{% endfor %}"
    )


# Per-base parts: (tokenizer, text config kwargs) -> (config kwargs, processor kwargs).
# CLIP's CLS token is one more feature, which the "default" strategy drops.
CLIP_FEATURES = {"vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
CLIP_SIZES = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def _llava_config(tok, text: dict) -> dict:
    clip = {"model_type": "clip_vision_model", **VIT, "image_size": 32, "patch_size": 8}
    return {
        "text_config": {"model_type": "llama", **text},
        "vision_config": {**clip, "projection_dim": 32},
        "image_token_index": tok.image_token_id,
        "image_seq_length": 16,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }


def _llava(tok, text: dict) -> tuple[dict, dict]:
    from transformers import LlavaImageProcessor

    image_processor = LlavaImageProcessor(**CLIP_SIZES)
    processor = {"image_processor": image_processor, "patch_size": 8, **CLIP_FEATURES}
    return _llava_config(tok, text), processor


def _llava_next(tok, text: dict) -> tuple[dict, dict]:
    from transformers import LlavaNextImageProcessor

    config = {**_llava_config(tok, text), "image_grid_pinpoints": PINPOINTS}
    image_processor = LlavaNextImageProcessor(**CLIP_SIZES, image_grid_pinpoints=PINPOINTS)
    processor = {"image_processor": image_processor, "patch_size": 8, **CLIP_FEATURES}
    return config, processor


def _llava_onevision(tok, text: dict) -> tuple[dict, dict]:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor

    config = {
        "text_config": {"model_type": "qwen2", **text},
        "vision_config": {
            "model_type": "siglip_vision_model",
            **VIT,
            "image_size": 32,
            "patch_size": 8,
            "vision_use_head": False,
        },
        "image_token_index": tok.image_token_id,
        "video_token_index": tok.video_token_id,
        "image_grid_pinpoints": PINPOINTS,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
    }
    tile = {"height": 32, "width": 32}
    processor = {
        "image_processor": LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=PINPOINTS),
        "video_processor": LlavaOnevisionVideoProcessor(size=tile),
        "num_image_tokens": 16,
        "vision_feature_select_strategy": "full",
    }
    return config, processor


def _qwen_vl(tok, text: dict, vision: dict, mrope: dict, patch: int, video_class):
    """The Qwen-VL families: same token ids and image processor, M-RoPE (``mrope``) over time,
    height and width, ``patch`` pixels per patch and 2x2 patches merged into one token. The
    merger's output width is the text's (``vision`` names it)."""
    from transformers import Qwen2VLImageProcessor

    rope = {"rope_type": "default", "rope_theta": 10000.0, **mrope}
    config = {
        "text_config": {**text, "rope_parameters": rope},
        "vision_config": {**vision, "patch_size": patch, "spatial_merge_size": 2},
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.video_token_id,
        "vision_start_token_id": tok.vision_start_token_id,
        "vision_end_token_id": tok.vision_end_token_id,
    }
    side = 2 * patch  # resized sides are multiples of a merged patch: 2x2 to 4x4 of them
    frames = {
        "size": {"shortest_edge": (2 * side) ** 2, "longest_edge": (4 * side) ** 2},
        "patch_size": patch,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    processor = {
        "image_processor": Qwen2VLImageProcessor(**frames),
        "video_processor": video_class(**frames),
    }
    return config, processor


# M-RoPE splits the rotary half of head_dim (16 / 2 = 8) into time, height and width sections;
# the configs' defaults ([16, 24, 24], [24, 20, 20]) are sized for head_dim 128. The same shares
# at any head_dim: Qwen2-VL's [2, 3, 3] and Qwen3-VL's [4, 2, 2] at 16.
def _mrope_section(head_dim: int, time_share: int) -> list[int]:
    half = head_dim // 2
    time = half // time_share
    height = (half - time) // 2
    return [time, height, half - time - height]


def _qwen2_vl(tok, text: dict) -> tuple[dict, dict]:
    from transformers import Qwen2VLVideoProcessor

    # embed_dim is the ViT's width; hidden_size the merger's output, the text width.
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],
        "num_heads": 2,
        "mlp_ratio": 2,
    }
    mrope = {"mrope_section": _mrope_section(text["head_dim"], 4)}
    return _qwen_vl(tok, text, vision, mrope, 14, Qwen2VLVideoProcessor)


def _qwen2_5_vl(tok, text: dict) -> tuple[dict, dict]:
    from transformers import Qwen2VLVideoProcessor

    # window_size is in pixels (14 * 2 * 4); full attention in the last of the 2 blocks.
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    mrope = {"mrope_section": _mrope_section(text["head_dim"], 4)}
    return _qwen_vl(tok, text, vision, mrope, 14, Qwen2VLVideoProcessor)


def _qwen3_vl(tok, text: dict) -> tuple[dict, dict]:
    from transformers import Qwen3VLVideoProcessor

    # num_position_embeddings must be a square; deepstack feeds both ViT blocks' features to
    # the first two decoder layers.
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
    }
    mrope = {"mrope_section": _mrope_section(text["head_dim"], 2), "mrope_interleaved": True}
    return _qwen_vl(tok, text, vision, mrope, 16, Qwen3VLVideoProcessor)


def _internvl(tok, text: dict) -> tuple[dict, dict]:
    from transformers import GotOcr2ImageProcessor, InternVLVideoProcessor

    # 32/8 = 4x4 patches per tile, pixel-shuffled (downsample 0.5) into 2x2 = 4 tokens.
    config = {
        "text_config": {"model_type": "qwen2", **text},
        "vision_config": {**VIT, "image_size": [32, 32], "patch_size": [8, 8]},
        "image_token_id": tok.context_image_token_id,
        "image_seq_length": 4,
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }
    tile = {"height": 32, "width": 32}
    image_processor = GotOcr2ImageProcessor(
        size=tile, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = {
        "image_processor": image_processor,
        "video_processor": InternVLVideoProcessor(size=tile),
        "image_seq_length": 4,
    }
    return config, processor


def _idefics3_config(tok, text: dict) -> dict:
    # 32/8 = 4x4 patches per tile, pixel-shuffled (scale 2) into 4 tokens.
    return {
        "text_config": {"model_type": "llama", **text},
        "vision_config": {**VIT, "image_size": 32, "patch_size": 8},
        "image_token_id": tok.image_token_id,
        "scale_factor": 2,
        "pad_token_id": tok.pad_token_id,
    }


# Images are split into 32-pixel tiles plus a downscaled global view.
TILES = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}


def _idefics3(tok, text: dict) -> tuple[dict, dict]:
    from transformers import Idefics3ImageProcessor

    image_processor = Idefics3ImageProcessor(**TILES, do_image_splitting=True)
    return _idefics3_config(tok, text), {"image_processor": image_processor, "image_seq_len": 4}


def _smolvlm(tok, text: dict) -> tuple[dict, dict]:
    from transformers import SmolVLMImageProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm import processing_smolvlm

    # SmolVLMProcessor refuses to start without the optional `num2words` package, which it uses
    # only to spell out a video's frame count in the prompt; without it the count is in digits.
    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str
    processor = {
        "image_processor": SmolVLMImageProcessor(**TILES, do_image_splitting=True),
        "video_processor": SmolVLMVideoProcessor(**TILES),
        "image_seq_len": 4,
    }
    return _idefics3_config(tok, text), processor


def _gemma3(tok, text: dict) -> tuple[dict, dict]:
    from transformers import Gemma3ImageProcessor

    # Sliding and full attention alternate so that both layer types (and their RoPEs) exist;
    # 4x4 patches are average-pooled into 2x2 = 4 tokens.
    layers = text["num_hidden_layers"]
    config = {
        "text_config": {
            **text,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
            + ["sliding_attention"] * (layers % 2),
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            **VIT,
            "image_size": 32,
            "patch_size": 8,
            "vision_use_head": False,
        },
        "mm_tokens_per_image": 4,
        "boi_token_index": tok.boi_token_id,
        "eoi_token_index": tok.eoi_token_id,
        "image_token_index": tok.image_token_id,
    }
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return config, {"image_processor": image_processor, "image_seq_length": 4}


def _randomise_gemma3_projection(model) -> None:
    # transformers initialises this projection to zeros, which would make every image look the
    # same to the language model.
    import torch

    with torch.no_grad():
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, model.config.initializer_range)


def _mistral3(tok, text: dict) -> tuple[dict, dict]:
    from transformers import PixtralImageProcessor

    config = {
        "text_config": {"model_type": "mistral", **text, "sliding_window": None},
        "vision_config": {
            "model_type": "pixtral",
            **VIT,
            "head_dim": 16,
            "image_size": 64,
            "patch_size": 8,
        },
        "image_token_index": tok.convert_tokens_to_ids("[IMG]"),
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
    }
    # The image processor's patch is the merged one (8 * 2), so resized sides divide into it.
    merged = {"height": 16, "width": 16}
    image_processor = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=merged)
    processor = {"image_processor": image_processor, "patch_size": 8, "spatial_merge_size": 2}
    return config, processor


@dataclass(frozen=True)
class _Base:
    """How one base is built."""

    processor: str  # the processor class's name in transformers
    placeholder: str  # the text the processor expands into an image's tokens
    chat_template: str
    parts: Callable[..., tuple[dict, dict]]  # see "Per-base parts" above
    eos: str
    bos: str | None = None
    pad: str = "<pad>"
    # Tokenizer attributes the processor reads (saved as the tokenizer's extra special tokens).
    named: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()  # further special tokens: chat-template words, tile tags
    after_init: Callable[[PreTrainedModel], None] | None = None


_LLAVA = {"named": {"image_token": "<image>"}, "bos": "<s>", "eos": "</s>"}
_QWEN = {
    "named": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
}
_IDEFICS = {
    "named": {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    },
    "eos": "<end_of_utterance>",
    "extra": ROW_COL_TAGS,
}

_BASES: dict[str, _Base] = {
    "llava": _Base("LlavaProcessor", "<image>", _vicuna(), _llava, **_LLAVA),
    "llava_next": _Base("LlavaNextProcessor", "<image>", _vicuna(), _llava_next, **_LLAVA),
    "llava_onevision": _Base(
        "LlavaOnevisionProcessor",
        "<image>",
        _chatml("<image>\n"),
        _llava_onevision,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
    ),
    "qwen2_vl": _Base("Qwen2VLProcessor", QWEN_IMAGE, _chatml(QWEN_IMAGE), _qwen2_vl, **_QWEN),
    "qwen2_5_vl": _Base(
        "Qwen2_5_VLProcessor", QWEN_IMAGE, _chatml(QWEN_IMAGE), _qwen2_5_vl, **_QWEN
    ),
    "qwen3_vl": _Base("Qwen3VLProcessor", QWEN_IMAGE, _chatml(QWEN_IMAGE), _qwen3_vl, **_QWEN),
    "internvl": _Base(
        "InternVLProcessor",
        "<IMG_CONTEXT>",
        _chatml("<IMG_CONTEXT>\n"),
        _internvl,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    ),
    "idefics3": _Base(
        "Idefics3Processor",
        "<image>",
        _idefics("<|begin_of_text|>"),
        _idefics3,
        bos="<|begin_of_text|>",
        **_IDEFICS,
    ),
    "smolvlm": _Base(
        "SmolVLMProcessor",
        "<image>",
        _idefics("<|im_start|>"),
        _smolvlm,
        bos="<|im_start|>",
        **_IDEFICS,
    ),
    "gemma3": _Base(
        "Gemma3Processor",
        "<start_of_image>",
        _gemma(),
        _gemma3,
        bos="<bos>",
        eos="<eos>",
        named={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        extra=("<start_of_turn>", "<end_of_turn>"),
        after_init=_randomise_gemma3_projection,
    ),
    "mistral3": _Base(
        "PixtralProcessor",
        "[IMG]",
        _mistral(),
        _mistral3,
        bos="<s>",
        eos="</s>",
        extra=("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    ),
}
BASES: tuple[str, ...] = tuple(_BASES)
_BASE_OF_PROCESSOR = {spec.processor: base for base, spec in _BASES.items()}
assert len(_BASE_OF_PROCESSOR) == len(_BASES), "two bases share a processor class"


def _spec(base: str) -> _Base:
    try:
        return _BASES[base]
    except KeyError:
        raise KeyError(f"unknown base {base!r}; known: {', '.join(BASES)}") from None


def image_placeholder(base: str) -> str:
    """The text that ``base``'s processor expands into one image's tokens."""
    return _spec(base).placeholder


def _tokenizer(spec: _Base, vocab_size: int = BASE_VOCAB_SIZE):
    """The offline tokenizer (``vocab_size`` tokens) with the base's special tokens, BOS/EOS/pad
    and chat template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = build_tokenizer(vocab_size).backend_tokenizer
    specials = [*spec.named.values(), *spec.extra, spec.bos, spec.eos, spec.pad]
    # Already known ones (e.g. <image>, <|im_end|>) keep their ids.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials) if t]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        extra_special_tokens=dict(spec.named),
        padding_side="left",
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def build_random_vlm(
    base: str,
    seed: int = 0,
    num_layers: int = 4,
    *,
    vocab_size: int = BASE_VOCAB_SIZE,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A randomly initialised dense VLM of ``base``'s architecture at tiny size (``num_layers``
    decoder layers), in eval mode, and its processor. Same seed, same weights. No download.

    Larger tiny sizes (the quickstart's): ``vocab_size`` is the offline tokenizer's before the
    family's special tokens; ``text`` replaces entries of ``TEXT`` or adds text-config keys
    (``initializer_range``), and the connector's output width and M-RoPE sections follow it;
    ``vision`` replaces keys of the base's own vision config. Returns (model, processor)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = _spec(base)
    tokenizer = _tokenizer(spec, vocab_size)
    text = {
        **TEXT,
        **(text or {}),
        "vocab_size": len(tokenizer),
        "num_hidden_layers": num_layers,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config_kwargs, processor_kwargs = spec.parts(tokenizer, text)
    if vision:
        config_kwargs["vision_config"] = {**config_kwargs["vision_config"], **vision}
    config = AutoConfig.for_model(base, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    if spec.after_init is not None:
        spec.after_init(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor_class = getattr(transformers, spec.processor)
    processor = processor_class(
        tokenizer=tokenizer, chat_template=spec.chat_template, **processor_kwargs
    )
    return model.eval(), processor


def vlm_inputs(processor: ProcessorMixin, images: list[Image], prompts: list[str]) -> BatchFeature:
    """Model inputs for one image per prompt: the processor applied to each prompt after its
    base's image placeholder, padded on the left, as PyTorch tensors."""
    if len(images) != len(prompts):
        raise ValueError(f"one image per prompt: {len(images)} images, {len(prompts)} prompts")
    name = type(processor).__name__
    if name not in _BASE_OF_PROCESSOR:
        raise KeyError(f"no tiny base uses {name}; known: {', '.join(_BASE_OF_PROCESSOR)}")
    placeholder = image_placeholder(_BASE_OF_PROCESSOR[name])
    return processor(
        images=[[image] for image in images],  # the images of each prompt
        text=[f"{placeholder}\n{prompt}" for prompt in prompts],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
