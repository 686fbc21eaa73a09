"""What the LVLM is made of: the base language model's dims and the vision tower.

These are the recipe's ``[model]`` and ``[vision]`` sections (``recipe.schema`` re-exports them,
as it does ``MoEConfig``); the builders in ``models/build.py`` take them. Each checks its own
values in ``problems()``.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class ModelSection:
    """The base language model: its transformers ``model_type`` and real config dims."""

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
    # A whole dense VLM to start from (its model_type, docs/bases.md): model.path is its
    # checkpoint and config its published config.json; no stage I, no [vision]/[projector].
    base: str = ""
    config: str = ""
    # Attention of the vision tower and the language model, in every stage and at inference.
    attn_implementation: AttnImplementation = DEFAULT_ATTN_IMPLEMENTATION
    extra: dict = field(default_factory=dict)  # further transformers config kwargs

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
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
