"""Official tensor names -> moetool names (pure: ``map_official_name``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from moetool.convert.backbones import Backbone


@dataclass(frozen=True)
class MappedName:
    """Where an official tensor goes. kind: copy | expert | router | split (fused qkv, three
    row ranges) | buffer (a recomputed constant, left out) | lm_head_bias | unknown."""

    kind: str
    targets: tuple[str, ...] = ()
    layer: int | None = None
    expert: int | None = None


LM_PREFIX = "language_model.model."
_QWEN_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
}
# Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
_QWEN_MLP = {"w1": "up_proj", "w2": "gate_proj", "c_proj": "down_proj"}
_BUFFER = re.compile(r"(?:\.rotary_emb\.inv_freq|\.embeddings\.position_ids|\.attn\.masked_bias)$")
_MOE = re.compile(
    r"^mlp\.deepspeed_moe\.(?:gate\.wg\.weight|experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<rest>.+))$"
)


def map_official_name(name: str, backbone: Backbone) -> MappedName:
    """Where the official tensor ``name`` lands in a moetool checkpoint (pure)."""
    p = re.escape(backbone.prefix)
    if _BUFFER.search(name):
        return MappedName("buffer")
    if name == "lm_head.weight":
        return MappedName("copy", ("language_model.lm_head.weight",))
    if name == "lm_head.bias":
        return MappedName("lm_head_bias")
    match = re.match(rf"^{p}\.image_tower\.image_tower\.vision_model\.(.+)$", name)
    if match:
        return MappedName("copy", (f"vision_tower.{match[1]}",))
    match = re.match(rf"^{p}\.mm_projector\.(?:image_spatial_proj\.)?([02])\.(weight|bias)$", name)
    if match:
        linear = "linear_1" if match[1] == "0" else "linear_2"
        return MappedName("copy", (f"multi_modal_projector.{linear}.{match[2]}",))
    if backbone.layout == "qwen":
        return _map_qwen(name)
    match = re.match(r"^model\.(embed_tokens\.weight|norm\.\w+|final_layernorm\.\w+)$", name)
    if match:
        return MappedName("copy", (LM_PREFIX + match[1],))
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not match:
        return MappedName("unknown")
    layer, rest = int(match[1]), match[2]
    moe = _MOE.match(rest)
    if moe:
        return _moe_target(layer, moe, lambda r: r)
    if rest.startswith("mlp.") and rest.split(".")[1] in ("deepspeed_moe", "coefficient", "mlp"):
        return MappedName("unknown")  # other DeepSpeed MoE parts (e.g. a residual MoE's)
    return MappedName("copy", (f"{LM_PREFIX}layers.{layer}.{rest}",), layer)


def _moe_target(layer: int, moe: re.Match, rename: Callable[[str], str | None]) -> MappedName:
    base = f"{LM_PREFIX}layers.{layer}.mlp."
    if moe["e"] is None:
        return MappedName("router", (base + "router.weight",), layer)
    rest = rename(moe["rest"])
    if rest is None:
        return MappedName("unknown")
    expert = int(moe["e"])
    return MappedName("expert", (f"{base}experts.{expert}.{rest}",), layer, expert)


def _qwen_mlp_rename(rest: str) -> str | None:
    module, _, param = rest.partition(".")
    return f"{_QWEN_MLP[module]}.{param}" if module in _QWEN_MLP and param == "weight" else None


def _map_qwen(name: str) -> MappedName:
    if name == "transformer.wte.weight":
        return MappedName("copy", (LM_PREFIX + "embed_tokens.weight",))
    if name == "transformer.ln_f.weight":
        return MappedName("copy", (LM_PREFIX + "norm.weight",))
    match = re.match(r"^transformer\.h\.(\d+)\.(.+)$", name)
    if not match:
        return MappedName("unknown")
    layer, rest = int(match[1]), match[2]
    base = f"{LM_PREFIX}layers.{layer}."
    if rest in _QWEN_LAYER:
        return MappedName("copy", (base + _QWEN_LAYER[rest],), layer)
    match = re.match(r"^attn\.c_attn\.(weight|bias)$", rest)
    if match:
        return MappedName(
            "split", tuple(f"{base}self_attn.{p}_proj.{match[1]}" for p in "qkv"), layer
        )
    moe = _MOE.match(rest)
    if moe:
        return _moe_target(layer, moe, _qwen_mlp_rename)
    if rest.startswith("mlp."):
        renamed = _qwen_mlp_rename(rest[4:])
        if renamed:
            return MappedName("copy", (f"{base}mlp.{renamed}",), layer)
    return MappedName("unknown")
