"""``MoEConfig``: every setting of the sparse architecture, in one frozen, validated place.

It is the recipe's ``[moe]`` section, the payload of a sparse checkpoint's ``moe`` config
section (``to_dict`` / ``from_dict``, checked on load), and what upcycling, conversion,
parameter counting and the model take.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

# A problem is (key, message); the recipe loader prefixes the key with ``moe.``.
Problem = tuple[str, str]

LayerLayout = Literal["interval", "first-half", "second-half", "all"] | tuple[int, ...]
LAYER_LAYOUTS = ("interval", "first-half", "second-half", "all")
ROUTER_INITS = ("normal", "zeros", "kaiming")
BALANCE_SCOPES = ("micro-batch", "global-batch")


class MoEConfigError(ValueError):
    """A MoE setting that is wrong; the message names every key at fault."""


def parse_layer_layout(text: str) -> LayerLayout:
    """``interval``, ``first-half``, ``second-half``, ``all`` or a list such as ``0,2,5``."""
    text = text.strip()
    if text in LAYER_LAYOUTS:
        return text
    try:
        indices = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"expected one of {', '.join(LAYER_LAYOUTS)} or a comma-separated list "
            f"of layer indices, got {text!r}"
        ) from None
    if not indices:
        raise ValueError("the layer list is empty")
    return indices


def resolve_moe_layers(layout: LayerLayout, num_layers: int) -> tuple[int, ...]:
    """Indices of the decoder layers that become MoE layers (0-based)."""
    if layout == "interval":
        return tuple(range(num_layers)[::2])  # the official code's range(L)[::2]
    if layout == "first-half":
        return tuple(range(num_layers // 2))
    if layout == "second-half":
        return tuple(range(num_layers // 2, num_layers))
    if layout == "all":
        return tuple(range(num_layers))
    return tuple(sorted(layout))


@dataclass(frozen=True)
class MoEConfig:
    """The sparse architecture (paper Eq. 5-11, Table 5) and how it is made from a dense one."""

    num_experts: int = 4
    top_k: int = 2
    layers: LayerLayout = "interval"  # a layout name or explicit decoder-layer indices
    # Combine weights: the top-k probabilities renormalised to sum to 1 (true; DeepSpeed's top-2,
    # Mixtral; keeps upcycling exact) or the raw softmax probabilities (false; DeepSpeed's top-1).
    # Unset: true for top_k >= 2, false for top-1. true with top-1 is refused (every weight
    # would be p / p = 1 and the LM loss would send the router no gradient).
    normalize_top_k: bool | None = None
    capacity_factor: float = 0.0  # training; 0 = dropless
    eval_capacity_factor: float = 0.0  # evaluation; 0 = dropless
    min_capacity: int = 0
    aux_loss_coef: float = 0.01  # alpha of Eq. 7
    z_loss_coef: float = 0.0
    # Expert fractions f_i of the aux loss over this rank's micro-batch (the paper's) or over
    # the global batch, all-reduced across data-parallel ranks (Qiu et al. 2025).
    balance_scope: Literal["micro-batch", "global-batch"] = "micro-batch"
    # Upcycling: how new routers start, and Drop-Upcycling (ratio of each expert's intermediate
    # neurons re-initialised; 0 = exact copies).
    router_init: Literal["normal", "zeros", "kaiming"] = "normal"
    router_std: float = 0.02
    drop_upcycling: float = 0.0

    @property
    def renormalize(self) -> bool:
        """Whether the top-k combine weights are renormalised (the resolved ``normalize_top_k``)."""
        if self.normalize_top_k is None:
            return self.top_k >= 2
        return self.normalize_top_k

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        return resolve_moe_layers(self.layers, num_layers)

    def problems(self, num_layers: int | None = None) -> list[Problem]:
        """Every problem of these settings; with ``num_layers``, layer indices are checked
        against the language model's depth too."""
        out: list[Problem] = []
        if self.num_experts < 2:
            out.append(
                (
                    "num_experts",
                    f"must be at least 2, got {self.num_experts} "
                    "(a dense model has no [moe] section)",
                )
            )
        if self.top_k < 1:
            out.append(("top_k", f"must be at least 1, got {self.top_k}"))
        elif self.top_k > self.num_experts:
            out.append(("top_k", f"{self.top_k} is greater than num_experts ({self.num_experts})"))
        if self.top_k == 1 and self.normalize_top_k:
            out.append(
                (
                    "normalize_top_k",
                    "true with top_k = 1 makes every combine weight p / p = 1, so the LM loss "
                    "sends the router no gradient and it learns from the balancing loss alone; "
                    "top-1 weights each token by its raw router probability (DeepSpeed's top-1 "
                    "gate): set normalize_top_k = false or leave it out",
                )
            )
        for key in (
            "capacity_factor",
            "eval_capacity_factor",
            "aux_loss_coef",
            "z_loss_coef",
            "router_std",
            "min_capacity",
        ):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                out.append((key, f"must be a finite number >= 0, got {value}"))
        if not (math.isfinite(self.drop_upcycling) and 0.0 <= self.drop_upcycling < 1.0):
            out.append(("drop_upcycling", f"must be in [0, 1), got {self.drop_upcycling}"))
        if self.router_init not in ROUTER_INITS:
            out.append(
                (
                    "router_init",
                    f"must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}",
                )
            )
        if self.balance_scope not in BALANCE_SCOPES:
            out.append(
                (
                    "balance_scope",
                    f"must be one of {', '.join(BALANCE_SCOPES)}, got {self.balance_scope!r}",
                )
            )
        out.extend(_layer_problems(self.layers, num_layers))
        return out

    def check(self, num_layers: int | None = None, prefix: str = "moe.") -> MoEConfig:
        """``self`` if it has no problems, else ``MoEConfigError`` naming each key."""
        problems = self.problems(num_layers)
        if problems:
            raise MoEConfigError("; ".join(f"{prefix}{key}: {msg}" for key, msg in problems))
        return self

    def resolved(self, num_layers: int) -> MoEConfig:
        """Checked, with ``layers`` as explicit indices and ``normalize_top_k`` decided: the
        form a checkpoint stores and the model runs."""
        self.check(num_layers)
        return dataclasses.replace(
            self, layers=self.layer_indices(num_layers), normalize_top_k=self.renormalize
        )

    def to_dict(self) -> dict:
        """Plain JSON data (layers as a list) for a checkpoint's ``moe`` config section."""
        data = dataclasses.asdict(self)
        if isinstance(self.layers, tuple):
            data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_layers: int | None = None) -> MoEConfig:
        """From a ``moe`` config section (or any mapping of these keys; missing keys take their
        defaults, so sections written by older releases load). Checked; with ``num_layers``
        the result is ``resolved``. Raises ``MoEConfigError`` naming every wrong key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[str] = []
        unknown = sorted(set(data) - set(fields))
        if unknown:
            problems.append(f"moe: unknown key(s) {unknown}; known: {', '.join(fields)}")
        kwargs = {}
        for name, value in data.items():
            if name not in fields:
                continue
            converted = _from_json(name, value)
            if converted is _WRONG:
                problems.append(f"moe.{name}: expected {_EXPECTED[name]}, got {value!r}")
            else:
                kwargs[name] = converted
        if problems:
            raise MoEConfigError("; ".join(problems))
        config = cls(**kwargs)
        return config.resolved(num_layers) if num_layers is not None else config.check()


def _layer_problems(layers: Any, num_layers: int | None) -> list[Problem]:
    if isinstance(layers, str):
        if layers not in LAYER_LAYOUTS:
            return [
                (
                    "layers",
                    f"expected one of {', '.join(LAYER_LAYOUTS)} or a list of layer indices, "
                    f"got {layers!r}",
                )
            ]
        return []
    out: list[Problem] = []
    if not layers:
        out.append(("layers", "the explicit layer list is empty"))
    if len(set(layers)) != len(layers):
        out.append(("layers", f"repeats a layer index: {list(layers)}"))
    negative = [i for i in layers if i < 0]
    if negative:
        out.append(("layers", f"layer indices must be >= 0, got {negative}"))
    if num_layers is not None:
        too_big = [i for i in layers if i >= num_layers]
        if too_big:
            out.append(
                (
                    "layers",
                    f"layer index {too_big} out of range: the language model has "
                    f"{num_layers} layers (0 … {num_layers - 1})",
                )
            )
    return out


_WRONG = object()
_EXPECTED = {
    "num_experts": "an integer",
    "top_k": "an integer",
    "layers": "a layout name or a list of integers",
    "normalize_top_k": "a boolean",
    "capacity_factor": "a number",
    "eval_capacity_factor": "a number",
    "min_capacity": "an integer",
    "aux_loss_coef": "a number",
    "z_loss_coef": "a number",
    "balance_scope": "a string",
    "router_init": "a string",
    "router_std": "a number",
    "drop_upcycling": "a number",
}


def _from_json(name: str, value: Any) -> Any:
    kind = _EXPECTED[name]
    if kind == "an integer":
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if kind == "a number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _WRONG
    if kind == "a boolean":
        return value if isinstance(value, bool) or value is None else _WRONG
    if kind == "a string":
        return value if isinstance(value, str) else _WRONG
    # layers
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        return tuple(value)
    return _WRONG
