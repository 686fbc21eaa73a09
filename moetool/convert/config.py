"""The official config -> the moetool sparse config: text, vision and ``moe`` sections."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from moetool.convert.backbones import Backbone, ConvertError
from moetool.models.moe.config import MoEConfig, MoEConfigError, resolve_moe_layers

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
        data = read_json_object(file, missing=f"--vision-config: no such file {file}")
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


def read_json_object(file: Path, missing: str) -> dict:
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
