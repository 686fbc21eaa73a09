"""The conversion plan: every output tensor as a byte range of a source tensor, checked
against the shapes the converted config expects (pure: ``plan_conversion``,
``convert_state_dict``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
)
from moetool.convert.backbones import Backbone, ConvertError
from moetool.convert.names import LM_PREFIX, map_official_name
from moetool.models.moe.config import MoEConfig


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
        return LM_PREFIX + name[len("model.language_model.") :]
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
    growable = {LM_PREFIX + "embed_tokens.weight", "language_model.lm_head.weight"}
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
