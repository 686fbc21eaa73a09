"""What the LVLM is made of: the base language model's dims and the vision tower.

These are the recipe's ``[model]`` and ``[vision]`` sections (``recipe.schema`` re-exports them,
as it does ``MoEConfig``); the builders in ``models/build.py`` take them. Each checks its own
values in ``problems()``.

A whole-VLM recipe (``[model] base`` set) starts from a published dense VLM instead: its
``[model]`` dims are those of the VLM's language model, read from the published ``config.json``
(``model.config``) by ``published_dims``, never written in the recipe.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from moetool.models.attention import (
    DEFAULT_ATTN_IMPLEMENTATION,
    AttnImplementation,
    family_problems,
)
from moetool.models.families import get_family, known_families

# A problem is (dotted key relative to the section, message).
Problem = tuple[str, str]

# The [model] keys a whole-VLM recipe takes from its base's published config.json.
PUBLISHED_DIMS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "ffn_hidden_size",
    "ffn_linears",
    "num_heads",
    "num_kv_heads",
    "tie_embeddings",
    "attention_bias",
)


def read_published_config(path: str, base: str) -> dict:
    """The JSON of a whole VLM's ``config.json``; a ``ValueError`` naming the file when it is
    missing, not JSON, or of another model_type than ``base``."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no such file {path}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON config ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    if raw.get("model_type") != base:
        raise ValueError(
            f"{path} has model_type {raw.get('model_type')!r}, not model.base {base!r}"
        )
    return raw


def published_dims(path: str, base: str) -> dict:
    """The ``[model]`` dims (``PUBLISHED_DIMS``) of the language model of the dense VLM whose
    ``config.json`` is at ``path``, as transformers reads that config: its text config (the
    class defaults filling what the file leaves out), the head tied as the VLM's model ties it.
    A ``ValueError`` naming the file when it cannot be read as a ``base`` config."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return dict(_published_dims(path, base, stat and (stat.st_mtime_ns, stat.st_size)))


@functools.lru_cache(maxsize=32)  # a recipe's load reads it twice (fill, then problems)
def _published_dims(path: str, base: str, _stamp: tuple[int, int] | None) -> tuple:
    raw = read_published_config(path, base)
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(base, **{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as err:  # transformers' config classes raise several kinds
        raise ValueError(
            f"{path}: transformers cannot read it as a {base} config ({err})"
        ) from None
    text = config.get_text_config()
    family = get_family(text.model_type, missing_ok=True)
    # Only set where the config has the switch (or moetool's family fixes it, e.g. qwen2).
    bias = getattr(text, "attention_bias", None)
    if bias is None:
        bias = (
            family.attention_bias if family and isinstance(family.attention_bias, bool) else False
        )
    dims = {
        "model_type": text.model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_layers": text.num_hidden_layers,
        "ffn_hidden_size": text.intermediate_size,
        "ffn_linears": 3,  # every base's language model has a gated (gate/up/down) FFN
        "num_heads": text.num_attention_heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        # transformers 5 ties the head as the whole VLM's config says (its top level, where
        # some configs forward the text config's older flag).
        "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "attention_bias": bool(bias),
    }
    return tuple(dims.items())


@dataclass(frozen=True)
class ModelSection:
    """The base language model: its transformers ``model_type`` and real config dims; or, with
    ``base`` set, the language model of a whole dense VLM, dims read from ``config``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    ffn_linears: int  # Table 1 "FFN Factor": 3 for gated (SwiGLU) FFNs, 2 for fc1/fc2
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    path: str = ""  # local checkpoint directory used when running for real
    # A whole-VLM recipe: the dense VLM's transformers model_type (a key of known_bases()) and
    # its published config.json (absolute once loaded); path is then the whole VLM checkpoint.
    base: str = ""
    config: str = ""
    # Attention of the vision tower and the language model, in every stage and at inference.
    attn_implementation: AttnImplementation = DEFAULT_ATTN_IMPLEMENTATION
    extra: dict = field(default_factory=dict)  # further transformers config kwargs

    def problems(self) -> list[Problem]:
        if self.base:
            return self._base_problems()
        out: list[Problem] = []
        if self.config:
            out.append(("config", "is set but model.base is empty: it names a whole VLM's config"))
        for key in ("vocab_size", "hidden_size", "num_layers", "ffn_hidden_size", "num_heads"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be positive, got {getattr(self, key)}"))
        if self.num_kv_heads <= 0 or (self.num_heads > 0 and self.num_heads % self.num_kv_heads):
            out.append(
                (
                    "num_kv_heads",
                    f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}",
                )
            )
        family = get_family(self.model_type, missing_ok=True)
        if family is None:
            out.append(
                (
                    "model_type",
                    f"unknown model_type {self.model_type!r}; known: {', '.join(known_families())}",
                )
            )
            return out
        if self.ffn_linears != family.ffn_linears:
            out.append(
                (
                    "ffn_linears",
                    f"{self.model_type} FFNs have {family.ffn_linears} linear layers, "
                    f"got {self.ffn_linears}",
                )
            )
        for key, fixed in (
            ("attention_bias", family.attention_bias),
            ("mlp_bias", family.mlp_bias),
            ("tie_embeddings", family.tie_embeddings),
        ):
            if isinstance(fixed, bool) and getattr(self, key) != fixed:
                out.append((key, f"{self.model_type} always has {key} = {str(fixed).lower()}"))
        out.extend(
            ("attn_implementation", problem)
            for problem in family_problems(self.attn_implementation, self.model_type)
        )
        if (
            self.num_heads > 0
            and self.hidden_size % self.num_heads
            and "head_dim" not in self.extra
        ):
            out.append(
                (
                    "num_heads",
                    f"must divide hidden_size ({self.hidden_size}) unless extra.head_dim is set",
                )
            )
        return out

    def _base_problems(self) -> list[Problem]:
        """A whole-VLM recipe: the base is known and its config is readable; the dims are the
        config's (the base's own config defines the architecture, so no family checks)."""
        from moetool.models.bases import known_bases

        if self.base not in known_bases():
            known = ", ".join(known_bases())
            return [("base", f"unknown vision-language model_type {self.base!r}; known: {known}")]
        if not self.config:
            return [
                (
                    "config",
                    f"is empty: a whole-VLM recipe (model.base = {self.base!r}) takes its "
                    "language model's dims from the base's published config.json; name it",
                )
            ]
        try:
            published_dims(self.config, self.base)
        except ValueError as err:
            return [("config", str(err))]
        return [
            ("attn_implementation", problem)
            for problem in family_problems(self.attn_implementation, self.model_type)
        ]


@dataclass(frozen=True)
class VisionSection:
    """The vision tower (CLIP or SigLIP) in the LLaVA-1.5 layout."""

    type: Literal["clip", "siglip"] = "clip"
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    intermediate_size: int = 4096
    num_heads: int = 16
    feature_layer: int = -2  # hidden state fed to the projector; CLS dropped for CLIP
    path: str = ""

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        for key in (
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "intermediate_size",
            "num_heads",
        ):
            if getattr(self, key) <= 0:
                out.append((key, f"must be positive, got {getattr(self, key)}"))
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            out.append(("num_heads", f"must divide hidden_size ({self.hidden_size})"))
        if not -self.num_layers <= self.feature_layer <= self.num_layers or self.feature_layer == 0:
            out.append(
                (
                    "feature_layer",
                    f"{self.feature_layer} is outside the tower's "
                    f"{self.num_layers} layers (use -1 … -{self.num_layers} or 1 … "
                    f"{self.num_layers})",
                )
            )
        return out

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2
