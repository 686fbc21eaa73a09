"""The LVLM from transformers parts, in the LLaVA-1.5 layout (shared/DESIGN.md "The model").

torch and transformers are imported inside the functions, so that importing moetool (and
running commands that need neither) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.models.families import get_family

if TYPE_CHECKING:
    from transformers import LlavaConfig, PretrainedConfig

    from moetool.recipe.schema import ModelSection, Recipe, VisionSection


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


def lvlm_config(recipe: Recipe) -> LlavaConfig:
    """LLaVA-1.5 config: vision tower, 2-layer GELU projector, the base LLM."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config(recipe.vision),
        text_config=text_config(recipe.model),
        vision_feature_layer=recipe.vision.feature_layer,
        # CLIP has a CLS token that LLaVA-1.5 drops ("default"); SigLIP has none ("full").
        vision_feature_select_strategy="default" if recipe.vision.type == "clip" else "full",
        projector_hidden_act="gelu",
        image_seq_length=recipe.vision.image_tokens,
    )


def build_meta_lvlm(config: LlavaConfig):
    """Instantiate the LVLM on the meta device: the real modules, no weights, no download."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)
