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
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from moetool._version import __version__
from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
    CheckpointError,
    SourceFiles,
    read_safetensors_header,
    tensor_bytes,
    write_sharded_safetensors,
)
from moetool.io import UnsafeOverwriteError, atomic_output_dir, check_overwrite
from moetool.models.moe.config import MoEConfig, MoEConfigError, resolve_moe_layers

SOURCE_FORMATS = ("moe-llava",)
IMAGE_TOKEN = "<image>"


class ConvertError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Backbones, by the official config's exact model_type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """An official MoE-LLaVA language-model class and the transformers family it maps onto."""

    official_model_type: str
    text_model_type: str  # transformers model_type of the converted language model
    layout: str  # "model": model.layers.{i}.… ; "qwen": transformer.h.{i}.… (Qwen-1 remote code)
    template: str  # default conversation template (moetool.data.templates)
    config_keys: tuple[tuple[str, str], ...] = ()  # (official key, transformers key) copied

    @property
    def prefix(self) -> str:
        return "transformer" if self.layout == "qwen" else "model"


_COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def _keys(*extra: str | tuple[str, str]) -> tuple[tuple[str, str], ...]:
    pairs = [(k, k) for k in _COMMON_KEYS]
    pairs += [(e, e) if isinstance(e, str) else e for e in extra]
    return tuple(pairs)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> None:
    if backbone.official_model_type in BACKBONES:
        raise ValueError(f"backbone {backbone.official_model_type!r} is already registered")
    BACKBONES[backbone.official_model_type] = backbone


for _backbone in (
    # Phi-2 (moellava/model/language_model/phi, the transformers 4.37 phi code).
    Backbone(
        "moe_llava_phi",
        "phi",
        "model",
        "phi",
        _keys(
            "layer_norm_eps", "partial_rotary_factor", "qk_layernorm", "resid_pdrop", "embd_pdrop"
        ),
    ),
    # StableLM-2 (remote-code StableLMEpoch; transformers' stablelm is its port).
    Backbone(
        "moe_llava_stablelm",
        "stablelm",
        "model",
        "stablelm",
        _keys(
            ("norm_eps", "layer_norm_eps"), ("rope_pct", "partial_rotary_factor"), "use_qkv_bias"
        ),
    ),
    # Qwen-1 (remote-code QWen): mapped onto qwen2, which has the same parameters.
    Backbone("moe_llava_qwen", "qwen2", "qwen", "qwen"),
    # Mistral-7B / OpenChat-3.5 (the published 7B model uses the openchat template).
    Backbone(
        "moe_llava_mistral",
        "mistral",
        "model",
        "openchat",
        _keys("rms_norm_eps", "sliding_window", "head_dim"),
    ),
    Backbone(
        "moe_llava_llama",
        "llama",
        "model",
        "mistral",
        _keys("rms_norm_eps", "attention_bias", "mlp_bias", "head_dim"),
    ),
    Backbone(
        "moe_llava_qwen1_5",
        "qwen2",
        "model",
        "qwen",
        _keys("rms_norm_eps", "use_sliding_window", "sliding_window", "max_window_layers"),
    ),
):
    register_backbone(_backbone)


def get_backbone(model_type: str | None) -> Backbone:
    backbone = BACKBONES.get(model_type or "")
    if backbone is None:
        raise ConvertError(
            f"model_type {model_type!r} is not a MoE-LLaVA model moetool converts; "
            f"known: {', '.join(BACKBONES)}"
        )
    return backbone


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

OFFICIAL_MOE_KEYS = frozenset(
    {
        "moe_enable",
        "moe_mode",
        "moe_layers_idx",
        "ep_size",
        "num_experts",
        "top_k_experts",
        "capacity_factor",
        "eval_capacity_factor",
        "min_capacity",
        "use_residual",
        "router_aux_loss_coef",
        "train_modules",
    }
)
_REQUIRED_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
TOWER_PRESETS = {
    # mm_image_tower (exact) -> recipe fragment holding its [vision] section
    "openai/clip-vit-large-patch14-336": "_base/clip-l-336.toml",
    "google/siglip-so400m-patch14-384": "_base/siglip-so400m-384.toml",
}
_VISION_MODEL_TYPES = {
    "clip": "clip_vision_model",
    "clip_vision_model": "clip_vision_model",
    "siglip": "siglip_vision_model",
    "siglip_vision_model": "siglip_vision_model",
}


def text_config_kwargs(official: Mapping, backbone: Backbone) -> dict:
    """transformers config kwargs of the converted language model (pure)."""
    missing = [k for k in _REQUIRED_TEXT_KEYS if official.get(k) is None]
    if missing:
        raise ConvertError(f"config.json: missing {', '.join(missing)}")
    if official.get("rope_scaling"):
        raise ConvertError(
            f"config.json: rope_scaling {official['rope_scaling']!r} is not converted "
            "(the published models have none)"
        )
    if backbone.layout == "qwen":
        return _qwen_text_kwargs(official)
    return {ours: official[theirs] for theirs, ours in backbone.config_keys if theirs in official}


def _qwen_text_kwargs(official: Mapping) -> dict:
    hidden, heads = official["hidden_size"], official["num_attention_heads"]
    problems = []
    if official.get("kv_channels", hidden // heads) * heads != hidden:
        problems.append(
            f"kv_channels {official['kv_channels']} x {heads} heads != hidden_size {hidden}"
        )
    if official.get("rotary_pct", 1.0) != 1.0:
        problems.append(f"rotary_pct {official['rotary_pct']} (qwen2 rotates whole heads)")
    if not official.get("no_bias", True):
        problems.append("no_bias false (qwen2 has no MLP or output-projection biases)")
    if official["intermediate_size"] % 2:
        problems.append(f"odd intermediate_size {official['intermediate_size']}")
    if problems:
        raise ConvertError(
            "config.json: Qwen-1 variant qwen2 cannot express: " + "; ".join(problems)
        )
    kwargs = {
        "vocab_size": official["vocab_size"],
        "hidden_size": hidden,
        "num_hidden_layers": official["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        # Qwen-1 counts both gated projections: w1 and w2 are intermediate_size / 2 wide.
        "intermediate_size": official["intermediate_size"] // 2,
        "hidden_act": "silu",
        "rms_norm_eps": official.get("layer_norm_epsilon", 1e-6),
        "rope_theta": float(official.get("rotary_emb_base", 10000.0)),
        "max_position_embeddings": official.get(
            "max_position_embeddings", official.get("seq_length", 8192)
        ),
        "tie_word_embeddings": official.get("tie_word_embeddings", False),
        "initializer_range": official.get("initializer_range", 0.02),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if official.get(key) is not None:
            kwargs[key] = official[key]
    return kwargs


def moe_section_from_official(
    official_moe: Mapping | None, num_layers: int, keep_capacity: bool = False
) -> MoEConfig:
    """moetool's ``moe`` config section from the official ``moe`` dict (pure).

    Dropless unless ``keep_capacity``. DeepSpeed's capacity, ceil(tokens / E * factor * k), is
    the same formula as moetool's ceil(k * tokens * factor / E), so the factors carry over."""
    if not official_moe:
        raise ConvertError("config.json has no moe section: not a MoE-LLaVA stage III checkpoint")
    unknown = sorted(set(official_moe) - OFFICIAL_MOE_KEYS)
    if unknown:
        raise ConvertError(f"config.json: unknown moe key(s) {unknown}")
    if not official_moe.get("moe_enable", True):
        raise ConvertError(
            "config.json: moe.moe_enable is false (a dense model, nothing to convert)"
        )
    if official_moe.get("use_residual"):
        raise ConvertError(
            "config.json: moe.use_residual is true (Residual/PR-MoE: a dense MLP plus a 2-way "
            "coefficient per layer); moetool's MoE block cannot represent it"
        )
    layers = official_moe.get("moe_layers_idx")
    if layers is None:
        mode = official_moe.get("moe_mode", "sparse")
        # The official moe_mode names of moetool's layer layouts.
        by_mode = {
            "sparse": "interval",
            "first_half": "first-half",
            "second_half": "second-half",
            "dense": "all",
        }
        if mode not in by_mode:
            raise ConvertError(
                f"config.json: moe.moe_mode {mode!r} without moe_layers_idx; "
                f"known: {', '.join(by_mode)}"
            )
        layers = resolve_moe_layers(by_mode[mode], num_layers)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ConvertError(
            f"config.json: moe.moe_layers_idx {layers} must be distinct indices in "
            f"0..{num_layers - 1}"
        )
    experts = official_moe.get("num_experts", 4)
    experts = list(experts) if isinstance(experts, list | tuple) else [experts] * len(layers)
    if len(experts) == 1:
        experts = experts * len(layers)
    if len(experts) != len(layers):
        raise ConvertError(
            f"config.json: moe.num_experts {experts} does not give one count per MoE layer "
            f"({len(layers)} layers)"
        )
    if len(set(experts)) != 1:
        raise ConvertError(
            f"config.json: moe.num_experts {experts} differs between layers; moetool's config "
            "has one expert count"
        )
    top_k = int(official_moe.get("top_k_experts", 2))
    if top_k not in (1, 2):
        raise ConvertError(
            f"config.json: moe.top_k_experts {top_k}; DeepSpeed gates top-1 or top-2"
        )
    # DeepSpeed renormalises the two top-2 weights; its top-1 weight is the raw probability,
    # which is MoEConfig's default for top-1.
    moe = MoEConfig(
        num_experts=int(experts[0]),
        top_k=top_k,
        layers=tuple(sorted(layers)),
        aux_loss_coef=float(official_moe.get("router_aux_loss_coef", 0.01)),
    )
    if keep_capacity:
        moe = dataclasses.replace(
            moe,
            capacity_factor=float(official_moe.get("capacity_factor", 1.0)),
            eval_capacity_factor=float(official_moe.get("eval_capacity_factor", 1.0)),
            min_capacity=int(official_moe.get("min_capacity", 4)),
        )
    try:
        return moe.resolved(num_layers)
    except MoEConfigError as err:
        raise ConvertError(f"config.json: {err}") from None


def check_official_llava_fields(official: Mapping) -> tuple[int, str]:
    """(vision_feature_layer, vision_feature_select_strategy) of an official config, or one
    error naming every field transformers' LLaVA cannot express."""
    problems = []
    projector = official.get("image_projector_type", official.get("mm_projector_type", "linear"))
    if projector != "mlp2x_gelu":
        problems.append(f"image_projector_type {projector!r} (only mlp2x_gelu converts)")
    if official.get("mm_video_tower"):
        problems.append(f"mm_video_tower {official['mm_video_tower']!r} (video models)")
    if official.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end true")
    feature = official.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if feature not in strategies:
        problems.append(f"mm_vision_select_feature {feature!r}")
    if problems:
        raise ConvertError("config.json: cannot convert " + "; ".join(problems))
    return int(official.get("mm_vision_select_layer", -2)), strategies[feature]


def vision_config_for(official: Mapping, vision_config: str | Path | None = None):
    """The vision tower's transformers config: from ``vision_config`` (a CLIP/SigLIP
    checkpoint directory or config.json) or the preset of the official ``mm_image_tower``."""
    from transformers import AutoConfig

    tower = official.get("mm_image_tower") or official.get("image_tower")
    if vision_config is not None:
        path = Path(vision_config)
        file = path / "config.json" if path.is_dir() else path
        data = _read_json_object(file, missing=f"--vision-config: no such file {file}")
        model_type = data.pop("model_type", None)
        if model_type not in _VISION_MODEL_TYPES:
            raise ConvertError(
                f"--vision-config: {file} has model_type {model_type!r}; "
                f"known: {', '.join(_VISION_MODEL_TYPES)}"
            )
        if model_type in ("clip", "siglip"):  # a dual encoder: take its vision half
            data = dict(data.get("vision_config") or {})
            data.pop("model_type", None)
        config = AutoConfig.for_model(_VISION_MODEL_TYPES[model_type], **data)
    elif tower in TOWER_PRESETS:
        import tomllib

        from moetool.models.build import vision_config as build_vision_config
        from moetool.recipe.paths import recipes_root
        from moetool.recipe.schema import VisionSection

        fragment = (recipes_root() / TOWER_PRESETS[tower]).read_text(encoding="utf-8")
        section = dict(tomllib.loads(fragment)["vision"])
        section.pop("path", None)
        config = build_vision_config(VisionSection(**section))
    else:
        raise ConvertError(
            f"config.json: mm_image_tower {tower!r} has no built-in preset "
            f"(known: {', '.join(TOWER_PRESETS)}); pass --vision-config with the tower's "
            "config.json or checkpoint directory"
        )
    mm_hidden = official.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != config.hidden_size:
        raise ConvertError(
            f"config.json: mm_hidden_size {mm_hidden} but the vision config's hidden_size is "
            f"{config.hidden_size}"
        )
    return config


def image_seq_length(vision_config, strategy: str) -> int:
    """Image tokens per image: patches (+ CLIP's CLS) minus the first token for "default" (the
    official ``patch`` feature drops token 0, for SigLIP too, which has no CLS)."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens += vision_config.model_type == "clip_vision_model"
    return tokens - (strategy == "default")


def build_sparse_config(
    official: Mapping,
    backbone: Backbone,
    vision_config,
    moe: MoEConfig,
    image_token_id: int,
    text_overrides: Mapping | None = None,
):
    """The converted model's ``MoELlavaConfig``."""
    from transformers import AutoConfig

    from moetool.models.configuration_moe_llava import MoELlavaConfig

    feature_layer, strategy = check_official_llava_fields(official)
    kwargs = text_config_kwargs(official, backbone)
    kwargs.update(text_overrides or {})
    text = AutoConfig.for_model(backbone.text_model_type, **kwargs)
    config = MoELlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=image_seq_length(vision_config, strategy),
        moe=moe.to_dict(),
    )
    config.architectures = ["MoELlavaForConditionalGeneration"]
    return config


# --------------------------------------------------------------------------------------------
# Tensor names
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedName:
    """Where an official tensor goes. kind: copy | expert | router | split (fused qkv, three
    row ranges) | buffer (a recomputed constant, left out) | lm_head_bias | unknown."""

    kind: str
    targets: tuple[str, ...] = ()
    layer: int | None = None
    expert: int | None = None


_LM = "language_model.model."
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
        return MappedName("copy", (_LM + match[1],))
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not match:
        return MappedName("unknown")
    layer, rest = int(match[1]), match[2]
    moe = _MOE.match(rest)
    if moe:
        return _moe_target(layer, moe, lambda r: r)
    if rest.startswith("mlp.") and rest.split(".")[1] in ("deepspeed_moe", "coefficient", "mlp"):
        return MappedName("unknown")  # other DeepSpeed MoE parts (e.g. a residual MoE's)
    return MappedName("copy", (f"{_LM}layers.{layer}.{rest}",), layer)


def _moe_target(layer: int, moe: re.Match, rename: Callable[[str], str | None]) -> MappedName:
    base = f"{_LM}layers.{layer}.mlp."
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
        return MappedName("copy", (_LM + "embed_tokens.weight",))
    if name == "transformer.ln_f.weight":
        return MappedName("copy", (_LM + "norm.weight",))
    match = re.match(r"^transformer\.h\.(\d+)\.(.+)$", name)
    if not match:
        return MappedName("unknown")
    layer, rest = int(match[1]), match[2]
    base = f"{_LM}layers.{layer}."
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


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedTensor:
    """An output tensor: rows ``rows`` of the official tensor ``source`` (all rows if None),
    followed by ``pad_rows`` zero rows (vocabulary grown to fit ``<image>``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # output shape
    source: str
    kind: str  # copy | expert | router | split
    rows: tuple[int, int] | None = None
    pad_rows: int = 0
    layer: int | None = None
    expert: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ConversionPlan:
    tensors: tuple[ConvertedTensor, ...]
    dropped: tuple[str, ...]  # official tensors left out on purpose (buffers, lm_head.bias)
    moe: MoEConfig  # resolved


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names (as moetool checkpoints store them) and shapes of every tensor the converted model
    has, from the model instantiated on the meta device."""
    import torch

    from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration

    with torch.device("meta"):
        model = MoELlavaForConditionalGeneration(config)
    return {_saved_name(n): tuple(t.shape) for n, t in model.state_dict().items()}


def _saved_name(name: str) -> str:
    # transformers' LLaVA module names -> the legacy layout its save_pretrained writes.
    if name.startswith("model.language_model."):
        return _LM + name[len("model.language_model.") :]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name.removeprefix("model.")


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, … ({len(items) - limit} more)" if len(items) > limit else shown


def plan_conversion(
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
    expected: Mapping[str, tuple[int, ...]],
    backbone: Backbone,
    moe: MoEConfig,
    drop_lm_head_bias: bool = False,
    grown_vocab: tuple[int, int] | None = None,
) -> ConversionPlan:
    """Which output tensor comes from which rows of which official tensor (pure).

    ``entries`` maps official names to (safetensors dtype, shape); ``expected`` the converted
    model's tensors to shapes (``expected_tensors``). Unknown tensors, missing experts or
    routers, missing tensors and shape mismatches are collected and raised as one error.
    ``grown_vocab`` (official rows, converted rows): the embedding and head gain zero rows."""
    growable = {_LM + "embed_tokens.weight", "language_model.lm_head.weight"}
    moe_layers, num_experts = set(moe.layers), moe.num_experts
    out: list[ConvertedTensor] = []
    produced: dict[str, str] = {}
    unknown, dropped, problems = [], [], []
    experts: dict[int, set[int]] = {}
    routers: set[int] = set()
    for name, (dtype, shape) in entries.items():
        shape = tuple(shape)
        mapped = map_official_name(name, backbone)
        if mapped.kind == "buffer":
            dropped.append(name)
            continue
        if mapped.kind == "lm_head_bias":
            if drop_lm_head_bias:
                dropped.append(name)
            else:
                problems.append(
                    f"{name}: the LLaVA head has no bias; the official MoE-LLaVA classes build "
                    "lm_head without one, so the official model never applies this tensor. "
                    "Pass --drop-lm-head-bias to leave it out (outputs then equal the official "
                    "model's)"
                )
            continue
        if mapped.kind == "unknown":
            unknown.append(name)
            continue
        if mapped.layer is not None and mapped.kind in ("expert", "router"):
            if mapped.layer not in moe_layers:
                problems.append(
                    f"{name}: layer {mapped.layer} holds a MoE block but moe_layers_idx "
                    f"{sorted(moe_layers)} does not list it"
                )
                continue
            if mapped.kind == "router":
                routers.add(mapped.layer)
            else:
                experts.setdefault(mapped.layer, set()).add(mapped.expert)
        pieces: list[tuple[str, tuple[int, int] | None]]
        if mapped.kind == "split":
            if not shape or shape[0] % 3:
                problems.append(f"{name}: fused q/k/v of shape {list(shape)} does not split in 3")
                continue
            third = shape[0] // 3
            pieces = [(t, (i * third, (i + 1) * third)) for i, t in enumerate(mapped.targets)]
        else:
            pieces = [(mapped.targets[0], None)]
        for target, rows in pieces:
            if target not in expected:
                unknown.append(name)
                break
            if target in produced:
                problems.append(f"{name} and {produced[target]} both map to {target}")
                continue
            produced[target] = name
            out_shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            want = tuple(expected[target])
            pad = 0
            if out_shape != want:
                if (
                    target in growable
                    and grown_vocab == (out_shape[0], want[0])
                    and out_shape[1:] == want[1:]
                ):
                    pad = want[0] - out_shape[0]
                else:
                    problems.append(
                        f"{name}: shape {list(out_shape)}, but the config gives "
                        f"{target} shape {list(want)}"
                    )
                    continue
            out.append(
                ConvertedTensor(
                    target,
                    dtype,
                    want,
                    name,
                    mapped.kind,
                    rows,
                    pad,
                    mapped.layer,
                    mapped.expert,
                )
            )
    for layer in sorted(moe_layers):
        missing_experts = sorted(set(range(num_experts)) - experts.get(layer, set()))
        if missing_experts:
            problems.append(
                f"layer {layer}: expert(s) {missing_experts} of {num_experts} missing "
                f"(…layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.…)"
            )
        if layer not in routers:
            problems.append(f"layer {layer}: router …mlp.deepspeed_moe.gate.wg.weight missing")
    missing = sorted(set(expected) - set(produced))
    lines = []
    if unknown:
        lines.append(f"unknown tensors ({len(unknown)}): {_listing(sorted(set(unknown)))}")
    lines += problems
    if missing:
        lines.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if lines:
        raise ConvertError("cannot convert:\n  " + "\n  ".join(lines))
    return ConversionPlan(tuple(out), tuple(dropped), moe)


def convert_state_dict(official: Mapping, plan: ConversionPlan) -> dict:
    """The converted state dict from an official one (pure; for tests and small models)."""
    import torch

    out = {}
    for spec in plan.tensors:
        tensor = official[spec.source]
        if spec.rows is not None:
            tensor = tensor[spec.rows[0] : spec.rows[1]]
        if spec.pad_rows:
            pad = tensor.new_zeros((spec.pad_rows, *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        out[spec.name] = tensor.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Reading official checkpoints
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class SourceCheckpoint:
    """The tensors of an official checkpoint directory, read lazily: safetensors (single or
    sharded) by byte range, or ``.bin`` (single or sharded) memory-mapped with
    ``torch.load(weights_only=True)``."""

    def __init__(self, src: Path):
        self.src = src
        self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._ranges: dict = {}
        self._tensors: dict = {}
        self._sources = SourceFiles()
        files = self._weight_files(src)
        origin: dict[str, Path] = {}
        for file in files:
            if file.suffix == ".safetensors":
                found = self._read_safetensors(file)
            else:
                found = self._read_bin(file)
            for name in found:
                if name in origin:
                    raise ConvertError(f"{name} is stored twice: in {origin[name]} and {file}")
                origin[name] = file

    @staticmethod
    def _weight_files(src: Path) -> list[Path]:
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (src / index).exists():
                try:
                    weight_map = json.loads((src / index).read_text())["weight_map"]
                except (ValueError, KeyError) as err:
                    raise ConvertError(f"{src / index}: not a weight index ({err})") from None
                files = [src / f for f in sorted(set(weight_map.values()))]
                absent = [f.name for f in files if not f.exists()]
                if absent:
                    raise ConvertError(f"{src / index} lists missing file(s): {', '.join(absent)}")
                return files
            if (src / single).exists():
                return [src / single]
        raise ConvertError(
            f"{src}: no weights (model.safetensors, pytorch_model.bin or their sharded indexes)"
        )

    def _read_safetensors(self, file: Path) -> list[str]:
        try:
            header = read_safetensors_header(file)
        except CheckpointError as err:
            raise ConvertError(str(err)) from None
        except (ValueError, OSError, KeyError, TypeError, struct.error) as err:
            raise ConvertError(f"{file}: not a safetensors file ({err})") from None
        for name, entry in header.items():
            if entry.dtype not in SAFETENSORS_DTYPE_BYTES:
                raise ConvertError(f"{file}: {name} has unsupported dtype {entry.dtype}")
            self.entries[name] = (entry.dtype, entry.shape)
            self._ranges[name] = entry
        return list(header)

    def _read_bin(self, file: Path) -> list[str]:
        import pickle
        import zipfile

        import torch

        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
        except (pickle.UnpicklingError, RuntimeError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise ConvertError(
                f"{file}: cannot be read with torch.load(weights_only=True) ({err})"
            ) from None
        if not isinstance(state, dict):
            raise ConvertError(f"{file}: holds a {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConvertError(f"{file}: {name} is a {type(tensor).__name__}, not a tensor")
            dtype = _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise ConvertError(f"{file}: {name} has unsupported dtype {tensor.dtype}")
            self.entries[name] = (dtype, tuple(tensor.shape))
            self._tensors[name] = tensor
        return list(state)

    def tensor(self, name: str):
        """One tensor, loaded (for tests and small models)."""
        if name in self._tensors:
            return self._tensors[name]
        from safetensors import safe_open

        entry = self._ranges[name]
        with safe_open(str(entry.file), "pt") as f:
            return f.get_tensor(name)

    def write(self, spec: ConvertedTensor, f) -> None:
        """Append the bytes of ``spec`` to the open file ``f``."""
        dtype, shape = self.entries[spec.source]
        row_bytes = math.prod(shape[1:]) * SAFETENSORS_DTYPE_BYTES[dtype]
        first, last = spec.rows if spec.rows is not None else (0, shape[0] if shape else 1)
        if spec.source in self._ranges:
            entry = self._ranges[spec.source]
            count = (last - first) * row_bytes if shape else entry.nbytes
            self._sources.copy(f, entry, first * row_bytes, count)
        else:
            tensor = self._tensors[spec.source]
            if spec.rows is not None:
                tensor = tensor[first:last]
            f.write(tensor_bytes(tensor))
        if spec.pad_rows:
            f.write(bytes(spec.pad_rows * row_bytes))

    def close(self) -> None:
        self._sources.close()


# --------------------------------------------------------------------------------------------
# Tokenizer and processor
# --------------------------------------------------------------------------------------------


def prepare_tokenizer(path: Path, template_name: str):
    """The base's tokenizer with ``<image>`` added (when missing), a pad token and the chat
    template. Returns (tokenizer, image token id, end-of-turn token id)."""
    from transformers import AutoTokenizer, PretrainedConfig

    from moetool.data.templates import TemplateError, get_template

    try:
        template = get_template(template_name)
    except TemplateError as err:
        raise ConvertError(f"--template: {err}") from None
    try:
        # A blank config: the official config.json names a model type transformers lacks.
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())
    except Exception as err:  # transformers raises many types for "not loadable here"
        raise ConvertError(
            f"{path}: no tokenizer that transformers loads without remote code "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass "
            "--tokenizer DIR with a transformers tokenizer of the same vocabulary "
            "(docs/convert.md names one per base)"
        ) from None
    vocab = tokenizer.get_vocab()
    if template.eos not in vocab:
        raise ConvertError(
            f"{path}: the {template.name!r} template ends turns with {template.eos!r}, which the "
            "tokenizer does not have; pass --template with the base's template"
        )
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # The official training pads with the unknown token (or end of text when there is none).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = template.jinja()
    return (
        tokenizer,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tokenizer.convert_tokens_to_ids(template.eos),
    )


def build_converted_processor(vision_config, tokenizer, strategy: str, vision_dir: Path | None):
    """LLaVA processor: the tower's image processor (from ``vision_dir`` when it has a
    ``preprocessor_config.json``, else the tower's standard one) and the tokenizer."""
    from transformers import AutoImageProcessor

    from moetool.models.build import llava_processor

    image_processor = None
    if vision_dir is not None and (vision_dir / "preprocessor_config.json").exists():
        image_processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    tower = "clip" if vision_config.model_type == "clip_vision_model" else "siglip"
    return llava_processor(
        tower,
        vision_config.image_size,
        vision_config.patch_size,
        tokenizer,
        strategy,
        image_processor,
    )


# --------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertOptions:
    vision_config: str | Path | None = None  # CLIP/SigLIP config.json or checkpoint directory
    tokenizer: str | Path | None = None  # tokenizer directory; default SRC
    template: str | None = None  # conversation template; default the backbone's
    keep_capacity: bool = False  # keep the official capacity factors (default: dropless)
    drop_lm_head_bias: bool = False


@dataclass(frozen=True)
class ConversionResult:
    plan: ConversionPlan
    backbone: Backbone
    config: object  # MoELlavaConfig
    template: str
    vocab_padded: tuple[int, int] | None  # (official vocab, converted vocab) when <image> grew it

    def summary(self) -> dict:
        return {
            "model_type": self.backbone.official_model_type,
            "text_model_type": self.backbone.text_model_type,
            "moe": self.plan.moe.to_dict(),
            "template": self.template,
            "image_token_id": self.config.image_token_id,
            "vision_tower": self.config.vision_config.model_type,
            "tensors": len(self.plan.tensors),
            "bytes": sum(t.nbytes for t in self.plan.tensors),
            "dropped": list(self.plan.dropped),
            "vocab_padded": list(self.vocab_padded) if self.vocab_padded else None,
        }


def _read_json_object(file: Path, missing: str) -> dict:
    """The JSON object in ``file``; ``missing`` is the error when the file does not exist."""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConvertError(missing) from None
    except ValueError as err:
        raise ConvertError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{file}: not a JSON object")
    return data


def load_official_config(src: Path) -> dict:
    return _read_json_object(
        src / "config.json", missing=f"{src}: not a checkpoint directory (no config.json)"
    )


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    options: ConvertOptions = ConvertOptions(),
    source_format: str = "moe-llava",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> ConversionResult:
    """Convert the official checkpoint directory ``src`` into the moetool checkpoint ``out``.

    Everything is checked before anything is written; the output is written to a temporary
    directory renamed when complete."""
    from transformers import GenerationConfig

    if source_format not in SOURCE_FORMATS:
        raise ConvertError(f"--from {source_format!r}; known: {', '.join(SOURCE_FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such checkpoint directory")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")
    inputs = [src, options.tokenizer, options.vision_config]
    try:
        check_overwrite(out, inputs)
    except UnsafeOverwriteError as err:
        raise ConvertError(str(err)) from None
    official = load_official_config(src)
    backbone = get_backbone(official.get("model_type"))
    text_kwargs = text_config_kwargs(official, backbone)
    moe = moe_section_from_official(
        official.get("moe"), text_kwargs["num_hidden_layers"], options.keep_capacity
    )
    source = SourceCheckpoint(src)
    try:
        vision = vision_config_for(official, options.vision_config)
        template = options.template or backbone.template
        tokenizer, image_token_id, eos_id = prepare_tokenizer(
            Path(options.tokenizer) if options.tokenizer else src, template
        )
        vocab = text_kwargs["vocab_size"]
        overrides = {"eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id}
        vocab_padded = None
        if image_token_id >= vocab:  # no spare embedding row: grow by zero rows
            vocab_padded = (vocab, image_token_id + 1)
            overrides["vocab_size"] = image_token_id + 1
        config = build_sparse_config(official, backbone, vision, moe, image_token_id, overrides)
        plan = plan_conversion(
            source.entries,
            expected_tensors(config),
            backbone,
            moe,
            options.drop_lm_head_bias,
            vocab_padded,
        )
        config.moetool = {
            "version": __version__,
            "stage": "converted",
            "source": str(src),
            "convert": {
                "from": source_format,
                "model_type": backbone.official_model_type,
                "official_moe": official.get("moe"),
                "capacity": "official" if options.keep_capacity else "dropless",
                "template": template,
                "dropped": list(plan.dropped),
                "vocab_padded": list(vocab_padded) if vocab_padded else None,
            },
        }
        vision_dir = Path(options.vision_config) if options.vision_config else None
        processor = build_converted_processor(
            vision,
            tokenizer,
            config.vision_feature_select_strategy,
            vision_dir if vision_dir is not None and vision_dir.is_dir() else None,
        )
        total = sum(t.nbytes for t in plan.tensors)
        written = 0

        def write_tensor(spec: ConvertedTensor, f) -> None:
            nonlocal written
            source.write(spec, f)
            written += spec.nbytes
            if progress:
                progress(written, total)

        with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
            write_sharded_safetensors(tmp, plan.tensors, write_tensor, max_shard_bytes)
            config.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            GenerationConfig(
                bos_token_id=config.text_config.bos_token_id,
                eos_token_id=eos_id,
                pad_token_id=tokenizer.pad_token_id,
            ).save_pretrained(tmp)
    finally:
        source.close()
    return ConversionResult(plan, backbone, config, template, vocab_padded)
