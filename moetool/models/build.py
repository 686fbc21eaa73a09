"""The LVLM from transformers parts, in the LLaVA-1.5 layout (docs/architecture.md).

torch and transformers are imported inside the functions, so that importing moetool (and
running commands that need neither) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.models.families import get_family

if TYPE_CHECKING:
    from transformers import LlavaConfig, PretrainedConfig

    from moetool.models.arch import ModelSection, VisionSection


def text_config(model: ModelSection) -> PretrainedConfig:
    """The transformers config of the recipe's base language model."""
    from transformers import AutoConfig

    family = get_family(model.model_type)
    return AutoConfig.for_model(model.model_type, **family.config_kwargs(model))


def vision_config(vision: VisionSection) -> PretrainedConfig:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision.type]
    return cls(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        intermediate_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )


def lvlm_config(
    model: ModelSection, vision: VisionSection, image_token_id: int | None = None
) -> LlavaConfig:
    """LLaVA-1.5 config: vision tower, 2-layer GELU projector, the base LLM.

    ``image_token_id`` is the tokenizer's ``<image>`` id (LlavaConfig's default when None)."""
    from transformers import LlavaConfig

    ids = {} if image_token_id is None else {"image_token_index": image_token_id}
    return LlavaConfig(
        **ids,
        vision_config=vision_config(vision),
        text_config=text_config(model),
        vision_feature_layer=vision.feature_layer,
        # CLIP has a CLS token that LLaVA-1.5 drops ("default"); SigLIP has none ("full").
        vision_feature_select_strategy="default" if vision.type == "clip" else "full",
        projector_hidden_act="gelu",
        image_seq_length=vision.image_tokens,
    )


def build_meta_lvlm(config: LlavaConfig):
    """Instantiate the LVLM on the meta device: the real modules, no weights, no download."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def llava_processor(
    tower: str,
    image_size: int,
    patch_size: int,
    tokenizer,
    strategy: str | None = None,
    image_processor=None,
    aspect_ratio: str = "pad",
):
    """LLaVA processor for a ``tower`` ("clip" or "siglip"): an image processor that shapes
    images as a stage with ``aspect_ratio`` does (see ``training_image_processor``; from the
    tower's standard one at ``image_size`` unless one is given) and the tokenizer. CLIP adds a
    CLS token that the default feature strategy drops; SigLIP has none."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    from moetool.data.image_processing import training_image_processor

    clip = tower == "clip"
    if image_processor is None and clip:
        crop = {"height": image_size, "width": image_size}
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    elif image_processor is None:
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=training_image_processor(image_processor, aspect_ratio),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy or ("default" if clip else "full"),
        num_additional_image_tokens=1 if clip else 0,
    )


def build_processor(vision: VisionSection, tokenizer, aspect_ratio: str = "pad"):
    """LLaVA processor: the tower's image processor at the recipe's resolution, shaping images
    as a stage with ``aspect_ratio`` does, + tokenizer."""
    return llava_processor(
        vision.type, vision.image_size, vision.patch_size, tokenizer, aspect_ratio=aspect_ratio
    )


def checkpoint_aspect_ratio(config: dict) -> str | None:
    """How a checkpoint's images were shaped in training ("pad" or "resize"), from its config's
    ``moetool`` block: the ``image_aspect_ratio`` upcycle and convert record, else the last
    stage's in the recipe snapshot, else "pad" (the schema's default, as moetool has always
    treated such checkpoints). None for a checkpoint moetool did not write, or of a base other
    than LLaVA-1.5's layout: its processor is taken as shipped."""
    from moetool.models.bases import is_llava_layout

    if not is_llava_layout(config.get("model_type") or "llava"):
        return None  # another base shapes images with its own processor, as published
    meta = config.get("moetool")
    if not isinstance(meta, dict):
        return None
    if meta.get("image_aspect_ratio"):
        return meta["image_aspect_ratio"]
    if not meta.get("recipe"):  # upcycled or converted from a checkpoint moetool did not train
        return None
    stages = (meta.get("recipe") or {}).get("stages") or {}
    return (stages.get(meta.get("stage")) or {}).get("image_aspect_ratio", "pad")


def carry_training_processor(checkpoint, aspect_ratio: str | None) -> None:
    """Rewrite the image processor config of ``checkpoint`` (a directory) so that it shapes
    images as ``aspect_ratio`` did in training, by itself; no change when it already does or
    when ``aspect_ratio`` is None. For upcycle and export, whose outputs copy the processor of
    a checkpoint possibly written before processors carried the padding. JSON only (no torch:
    the streaming upcycle never imports it)."""
    import json
    from pathlib import Path

    from moetool.data.image_processing import training_settings

    if aspect_ratio is None:
        return
    nested = Path(checkpoint) / "processor_config.json"  # transformers 5: inside the processor's
    flat = Path(checkpoint) / "preprocessor_config.json"
    if nested.is_file() and "image_processor" in (data := json.loads(nested.read_text())):
        new = training_settings(data["image_processor"], aspect_ratio)
        if new is not None:
            data["image_processor"] = new
            nested.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    elif flat.is_file():
        new = training_settings(json.loads(flat.read_text()), aspect_ratio)
        if new is not None:
            flat.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def save_checkpoint(model, processor, out, overwrite: bool = False, metadata=None) -> None:
    """``save_pretrained`` of model and processor into ``out``, atomically: written to a
    temporary sibling and renamed when complete; an existing ``out`` needs ``overwrite``."""
    from moetool.io import atomic_output_dir

    with atomic_output_dir(out, overwrite) as tmp:
        if metadata is not None:
            model.config.moetool = metadata
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def base_tokenizer(model_section: ModelSection):
    """The base LLM's own tokenizer (``model.path``), with ``<image>`` added if missing: what
    stage I trains with and every later stage's checkpoint carries."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_section.path)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_lvlm_from_parts(model_section: ModelSection, vision: VisionSection, dtype=None):
    """The stage-I starting point of a real run: the base LLM from ``model.path``, the vision
    tower from ``vision.path`` (local transformers checkpoints, read with safetensors), and a
    fresh projector. The tokenizer is the base's own, with ``<image>`` added if missing.

    Both parts attend with ``model.attn_implementation``. Returns (model, processor). Raises
    FileNotFoundError naming the recipe key of a missing path.
    """
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, LlavaForConditionalGeneration

    for key, value in (("model.path", model_section.path), ("vision.path", vision.path)):
        if not value or not Path(value).is_dir():
            raise FileNotFoundError(f"{key}: {value!r} is not a local checkpoint directory")
    tokenizer = base_tokenizer(model_section)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    attention = model_section.attn_implementation
    llm = AutoModelForCausalLM.from_pretrained(
        model_section.path, dtype=dtype, use_safetensors=True, attn_implementation=attention
    )
    vision_tower = _as_vision_model(
        AutoModel.from_pretrained(
            vision.path, dtype=dtype, use_safetensors=True, attn_implementation=attention
        )
    )
    config = lvlm_config(model_section, vision, image_token_id)
    config.text_config = llm.config
    config.vision_config = vision_tower.config
    config._attn_implementation = attention
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision_tower
    model.model.multi_modal_projector.to_empty(device="cpu")
    model.model.multi_modal_projector.apply(model._init_weights)
    if image_token_id >= llm.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if dtype is not None:
        model.to(dtype)
    return model, build_processor(vision, tokenizer)


def _as_vision_model(tower):
    """The CLIP/SigLIP *VisionModel* of a vision-only or a dual-encoder checkpoint."""
    if type(tower).__name__.endswith("VisionModel"):
        return tower
    vision = getattr(tower, "vision_model", None)
    if vision is None or not type(vision).__name__.endswith("VisionModel"):
        raise ValueError(f"vision.path: {type(tower).__name__} has no CLIP/SigLIP vision model")
    return vision
