"""Official language-model classes (by the official config's exact ``model_type``) and the
transformers families they map onto; ``ConvertError`` for every conversion problem."""

from __future__ import annotations

from dataclasses import dataclass

SOURCE_FORMATS = ("moe-llava",)
IMAGE_TOKEN = "<image>"


class ConvertError(ValueError):
    pass


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
