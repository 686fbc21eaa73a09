"""Decoder-only language-model families moetool knows, keyed by exact transformers ``model_type``.

A family says how a recipe's ``[model]`` dims map onto the family's transformers config, and which
of the recipe's structural switches the architecture fixes. Pure data: importing this module does
not import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    model_type: str
    ffn_linears: int  # 3: gated gate/up/down; 2: fc1/fc2 style
    # Each switch is either fixed by the architecture (a bool) or set through a config key (str).
    attention_bias: bool | str = False
    mlp_bias: bool | str = False
    tie_embeddings: bool | str = "tie_word_embeddings"
    kv_heads_key: str | None = "num_key_value_heads"
    defaults: dict = field(default_factory=dict)  # config kwargs every instance of ours gets
    # Exact attribute names in the transformers decoder (stage policies and parameter counts):
    # each decoder layer's attention and norms, and the language model's final norm.
    attention: str = "self_attn"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "norm"
    # Attention implementations transformers' model of the family refuses (its _supports_* flags).
    attn_unsupported: tuple[str, ...] = ()

    def config_kwargs(self, model) -> dict:
        """transformers config kwargs for a recipe's ``ModelSection``."""
        kwargs = {
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "num_hidden_layers": model.num_layers,
            "intermediate_size": model.ffn_hidden_size,
            "num_attention_heads": model.num_heads,
        }
        if self.kv_heads_key:
            kwargs[self.kv_heads_key] = model.num_kv_heads
        for switch in ("attention_bias", "mlp_bias", "tie_embeddings"):
            key = getattr(self, switch)
            if isinstance(key, str):
                kwargs[key] = getattr(model, switch)
        kwargs.update(self.defaults)
        kwargs.update(model.extra)
        return kwargs


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    if family.model_type in _FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family


def get_family(model_type: str, missing_ok: bool = False) -> Family | None:
    family = _FAMILIES.get(model_type)
    if family is None and not missing_ok:
        raise KeyError(f"unknown model_type {model_type!r}; known: {', '.join(known_families())}")
    return family


def known_families() -> list[str]:
    return sorted(_FAMILIES)


# transformers' usual decoder names, for counting a config whose model_type is no family of ours.
TRANSFORMERS_DEFAULT = Family("", ffn_linears=3)


def decoder_names(model_type: str) -> Family:
    """The family of ``model_type``, or transformers' usual decoder names for other types."""
    return get_family(model_type, missing_ok=True) or TRANSFORMERS_DEFAULT


for _family in (
    # Phi-2: fc1/fc2 with biases, LayerNorm with bias, untied head with bias.
    Family(
        "phi",
        ffn_linears=2,
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=False,
        layer_norms=("input_layernorm",),  # attention and MLP in parallel after one norm
        final_norm="final_layernorm",
    ),
    # StableLM-2: gated FFN without bias, optional qkv bias, LayerNorm.
    Family(
        "stablelm",
        ffn_linears=3,
        attention_bias="use_qkv_bias",
        attn_unsupported=("flex_attention",),
    ),
    # Qwen2 (and Qwen-1, which has the same parameters): qkv bias always on.
    Family("qwen2", ffn_linears=3, attention_bias=True),
    Family("qwen3", ffn_linears=3, attention_bias="attention_bias"),
    Family("llama", ffn_linears=3, attention_bias="attention_bias", mlp_bias="mlp_bias"),
    # Mistral (OpenChat-3.5 is a Mistral-7B fine-tune).
    Family("mistral", ffn_linears=3),
    Family(
        "gemma2",
        ffn_linears=3,
        attention_bias="attention_bias",
        tie_embeddings=True,
        attn_unsupported=("sdpa",),  # sdpa has no logit soft-capping
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
    ),
):
    register_family(_family)
