"""Published MoE-LLaVA checkpoints (DeepSpeed MoE layout) -> moetool sparse checkpoints.

The official checkpoints hold each MoE layer as a DeepSpeed ``MoE`` module
(``…mlp.deepspeed_moe.gate.wg`` and ``…mlp.deepspeed_moe.experts.deepspeed_experts.{e}.…``), the
projector as ``mm_projector`` and the vision tower as ``image_tower.image_tower`` inside a
remote-code or 4.37-era language model. The mapping is pure (``map_official_name``,
``plan_conversion``, ``convert_state_dict``); ``convert_checkpoint`` streams tensor by tensor:
every output tensor is a byte range of a source tensor (Qwen-1's fused ``c_attn`` splits into
three row ranges), so safetensors sources are never loaded and ``.bin`` sources are memory-mapped
(``torch.load(weights_only=True, mmap=True)``).

Routing: DeepSpeed's top-2 gate picks the second expert with Gumbel noise (in evaluation too) and
drops assignments beyond an expert's capacity. Converted models route deterministically (the
two most probable experts) and dropless by default; ``keep_capacity`` keeps the official
capacity factors (docs/convert.md says where the two still differ).

The package, by concern: ``backbones`` (official model types -> transformers families),
``config`` (config translation, Qwen-1 included), ``names`` (tensor renames), ``plan`` (the plan
and its checks), ``source`` (reading official .bin/safetensors files), ``processor`` (tokenizer
and processor), ``checkpoint`` (the whole conversion).
"""

from moetool.convert.backbones import (
    BACKBONES,
    SOURCE_FORMATS,
    Backbone,
    ConvertError,
    get_backbone,
    register_backbone,
)
from moetool.convert.checkpoint import ConversionResult, ConvertOptions, convert_checkpoint
from moetool.convert.config import moe_section_from_official, vision_config_for
from moetool.convert.names import map_official_name
from moetool.convert.plan import convert_state_dict, plan_conversion

__all__ = [
    "BACKBONES",
    "SOURCE_FORMATS",
    "Backbone",
    "ConversionResult",
    "ConvertError",
    "ConvertOptions",
    "convert_checkpoint",
    "convert_state_dict",
    "get_backbone",
    "map_official_name",
    "moe_section_from_official",
    "plan_conversion",
    "register_backbone",
    "vision_config_for",
]
