"""The dense vision-language models moetool makes sparse, keyed by exact transformers
``model_type``: where each keeps its language model, vision encoder and connector.

The MoE belongs to the language model: every base's decoder layers each have an ``mlp`` that a
MoE block of copies of it replaces, whatever wraps them. A base says where its parts sit (exact
attribute names under the inner ``…Model``, never class names) and how its checkpoints name the
decoder layers on disk (transformers writes some bases in their older key layout). Pure data:
importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SPARSE_PREFIX = "moetool_"  # a sparse checkpoint's model_type: "moetool_" + its base's


@dataclass(frozen=True)
class VLMBase:
    model_type: str  # the dense VLM's transformers model_type
    language_model: str = "language_model"  # the decoder, under the inner model (model.model)
    vision: str = "vision_tower"  # the vision encoder, under the inner model
    # Modules and parameters (dotted, under the inner model) that carry image features into the
    # language model: the "projector" part. Claimed before the vision encoder, so a merger that
    # sits inside it (Qwen-VL's visual.merger) counts as the connector.
    connector: tuple[str, ...] = ("multi_modal_projector",)
    # On-disk prefixes of the decoder layers, as regular expressions (the key up to "<i>.mlp.").
    layer_keys: tuple[str, ...] = (
        r"language_model\.model\.layers\.",
        r"model\.language_model\.layers\.",
    )
    # transformers' own sparse twin of the whole VLM, where one exists (export --to native)
    native: str | None = None

    @property
    def sparse_model_type(self) -> str:
        return SPARSE_PREFIX + self.model_type

    @property
    def layer_key(self) -> re.Pattern[str]:
        """On-disk names of the language model's decoder-layer parameters: prefix, layer, the
        rest."""
        prefixes = "|".join(self.layer_keys)
        return re.compile(rf"^(?P<prefix>(?:{prefixes}))(?P<layer>\d+)\.(?P<rest>.+)$")

    @property
    def mlp_key(self) -> re.Pattern[str]:
        """On-disk names of the language model's FFN parameters: prefix, layer, the rest."""
        prefixes = "|".join(self.layer_keys)
        return re.compile(rf"^(?P<prefix>(?:{prefixes}))(?P<layer>\d+)\.mlp\.(?P<rest>.+)$")


_QWEN_VL_KEYS = (r"model\.layers\.", r"model\.language_model\.layers\.")  # older, newer
_QWEN_VL_MERGER = ("visual.merger",)
_IDEFICS3_LAYOUT = {
    "language_model": "text_model",
    "vision": "vision_model",
    "connector": ("connector",),
    "layer_keys": (r"model\.text_model\.layers\.",),
}
_BASES: dict[str, VLMBase] = {
    base.model_type: base
    for base in (
        VLMBase("llava"),
        VLMBase("llava_next", connector=("multi_modal_projector", "image_newline")),
        VLMBase("llava_onevision", connector=("multi_modal_projector", "image_newline")),
        VLMBase("qwen2_vl", vision="visual", connector=_QWEN_VL_MERGER, layer_keys=_QWEN_VL_KEYS),
        VLMBase("qwen2_5_vl", vision="visual", connector=_QWEN_VL_MERGER, layer_keys=_QWEN_VL_KEYS),
        VLMBase(
            "qwen3_vl",
            vision="visual",
            connector=("visual.merger", "visual.deepstack_merger_list"),
            native="qwen3_vl_moe",
        ),
        VLMBase("internvl"),
        VLMBase("idefics3", **_IDEFICS3_LAYOUT),
        VLMBase("smolvlm", **_IDEFICS3_LAYOUT),  # Idefics3's architecture
        VLMBase("gemma3"),
        VLMBase("mistral3"),
    )
}


def get_base(model_type: str) -> VLMBase:
    """The base of a dense ``model_type`` or of its sparse ``moetool_<base>``; a ``KeyError``
    listing the known bases otherwise."""
    name = model_type.removeprefix(SPARSE_PREFIX)
    if name not in _BASES:
        raise KeyError(
            f"unknown vision-language model_type {model_type!r}; moetool knows: "
            + ", ".join(known_bases())
        )
    return _BASES[name]


def is_llava_layout(model_type: str) -> bool:
    """Whether a dense or sparse ``model_type`` is the LLaVA-1.5 layout moetool assembles
    (moetool's conversation templates and image shaping); every other base is encoded and
    prompted with its own processor and chat template."""
    return get_base(model_type).model_type == "llava"


def known_bases() -> list[str]:
    return list(_BASES)


def is_sparse_model_type(model_type: str | None) -> bool:
    return (
        bool(model_type)
        and model_type.startswith(SPARSE_PREFIX)
        and (model_type.removeprefix(SPARSE_PREFIX) in _BASES)
    )
