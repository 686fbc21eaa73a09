"""Dense LVLM -> sparse LVLM: copy each chosen FFN into E experts and add a router.

The maths is in pure functions (``plan_upcycle``, ``upcycle_state_dict``); ``upcycle_checkpoint``
streams a safetensors checkpoint tensor by tensor: FFN and other tensors are copied byte ranges
(``copy_file_range``), so the whole model is never in memory; only routers and Drop-Upcycled
experts are computed.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetool._version import __version__
from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
    CheckpointError,
    CheckpointTransform,
    TensorEntry,
    read_checkpoint_index,  # noqa: F401 (where a plan's entries come from; tests import it here)
    tensor_bytes,
)
from moetool.models.attention import checkpoint_attn_implementation
from moetool.models.bases import get_base, is_sparse_model_type
from moetool.models.build import carry_training_processor, checkpoint_aspect_ratio
from moetool.models.moe.config import MoEConfig, MoEConfigError

# Language-model FFN parameters of the LLaVA layout: `<prefix>language_model<...>layers.<i>.mlp.`;
# other bases name theirs as their VLMBase says (``mlp_key``).
_MLP_KEY = get_base("llava").mlp_key


class UpcycleError(CheckpointError):
    pass


@dataclass(frozen=True)
class MLPStructure:
    """A known FFN layout: projections into the intermediate width, and the one out of it."""

    name: str
    in_projections: tuple[str, ...]
    out_projection: str

    @property
    def modules(self) -> frozenset[str]:
        return frozenset((*self.in_projections, self.out_projection))


MLP_STRUCTURES = (
    MLPStructure(
        "gated gate_proj/up_proj/down_proj (llama, mistral, qwen2, qwen3, gemma2, stablelm, …)",
        ("gate_proj", "up_proj"),
        "down_proj",
    ),
    MLPStructure("two-layer fc1/fc2 (phi, clip-style)", ("fc1",), "fc2"),
    MLPStructure("two-layer c_fc/c_proj (starcoder2, gpt2-style)", ("c_fc",), "c_proj"),
    MLPStructure("gated w1/w3/w2", ("w1", "w3"), "w2"),
)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None  # dense tensor it comes from (None: a new router)
    kind: str  # "copy" | "expert" | "router"
    layer: int | None = None
    expert: int | None = None
    role: str | None = None  # for experts: "in", "out" or "other" (drop-upcycling dims)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class UpcyclePlan:
    tensors: tuple[OutputTensor, ...]
    moe_layers: tuple[int, ...]
    structure: MLPStructure
    hidden_size: int
    moe: MoEConfig  # resolved: layers as indices, combine-weight mode decided
    seed: int = 0  # of the router and Drop-Upcycling initialisation


def detect_structure(modules: set[str], where: str) -> MLPStructure:
    for structure in MLP_STRUCTURES:
        if modules == structure.modules:
            return structure
    supported = "; ".join(s.name for s in MLP_STRUCTURES)
    raise UpcycleError(f"{where}: unknown MLP structure {sorted(modules)}; supported: {supported}")


def plan_upcycle(
    entries: dict[str, TensorEntry | tuple[str, tuple[int, ...]]],
    num_layers: int,
    hidden_size: int,
    moe: MoEConfig,
    seed: int = 0,
    mlp_key: re.Pattern[str] = _MLP_KEY,
) -> UpcyclePlan:
    """Which output tensor comes from which dense tensor. ``entries`` maps names to
    ``TensorEntry`` or ``(dtype, shape)``; order of the output follows the input. ``mlp_key``
    finds the language model's FFN parameters (the base's on-disk names)."""
    try:
        moe = moe.resolved(num_layers)
    except MoEConfigError as err:
        raise UpcycleError(str(err)) from None
    moe_layers = moe.layers

    def dtype_shape(entry):
        return (entry.dtype, entry.shape) if isinstance(entry, TensorEntry) else entry

    mlp_keys: dict[int, dict[str, str]] = {}
    prefixes: dict[int, str] = {}
    for name in entries:
        match = mlp_key.match(name)
        if match:
            layer = int(match["layer"])
            mlp_keys.setdefault(layer, {})[match["rest"]] = name
            prefixes[layer] = match["prefix"]
    missing = [i for i in moe_layers if i not in mlp_keys]
    if missing:
        raise UpcycleError(f"no language-model MLP weights found for layer(s) {missing}")
    structure = None
    for layer in moe_layers:
        modules = {rest.rsplit(".", 1)[0] for rest in mlp_keys[layer]}
        found = detect_structure(modules, f"layer {layer} mlp")
        if structure is not None and found != structure:
            raise UpcycleError(f"layer {layer} mlp is {found.name}, others are {structure.name}")
        structure = found

    moe_sources = {mlp_keys[i][rest]: (i, rest) for i in moe_layers for rest in mlp_keys[i]}
    out: list[OutputTensor] = []
    routers_done: set[int] = set()
    for name, entry in entries.items():
        dtype, shape = dtype_shape(entry)
        if name not in moe_sources:
            out.append(OutputTensor(name, dtype, tuple(shape), name, "copy"))
            continue
        layer, rest = moe_sources[name]
        if layer not in routers_done:
            routers_done.add(layer)
            out.append(
                OutputTensor(
                    f"{prefixes[layer]}{layer}.mlp.router.weight",
                    "F32",
                    (moe.num_experts, hidden_size),
                    None,
                    "router",
                    layer,
                )
            )
        module = rest.rsplit(".", 1)[0]
        role = (
            "in"
            if module in structure.in_projections
            else "out"
            if module == structure.out_projection
            else "other"
        )
        for e in range(moe.num_experts):
            out.append(
                OutputTensor(
                    f"{prefixes[layer]}{layer}.mlp.experts.{e}.{rest}",
                    dtype,
                    tuple(shape),
                    name,
                    "expert",
                    layer,
                    e,
                    role,
                )
            )
    return UpcyclePlan(tuple(out), moe_layers, structure, hidden_size, moe, seed)


def _generator(seed: int, *parts: int):
    import torch

    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr((seed, *parts)).encode()))  # stable across processes
    return g


def init_router(plan: UpcyclePlan, layer: int):
    """Router weight (E, hidden) as a float32 numpy array: normal(0, std), zeros, or
    kaiming-uniform (nn.Linear's default). numpy keeps streaming upcycles free of torch."""
    import numpy as np

    o = plan.moe
    rng = np.random.default_rng(zlib.crc32(repr((plan.seed, 1, layer)).encode()))
    shape = (o.num_experts, plan.hidden_size)
    if o.router_init == "normal":
        return rng.normal(0.0, o.router_std, size=shape).astype(np.float32)
    if o.router_init == "kaiming":
        bound = 1.0 / math.sqrt(plan.hidden_size)  # kaiming_uniform_(a=sqrt(5)) of nn.Linear
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)


def dropped_neurons(plan: UpcyclePlan, layer: int, expert: int, intermediate: int):
    """Drop-Upcycling: the intermediate neurons of ``expert`` that are re-initialised; one
    random set per expert, shared by its projections."""
    import torch

    count = round(plan.moe.drop_upcycling * intermediate)
    g = _generator(plan.seed, 2, layer, expert)
    return torch.randperm(intermediate, generator=g)[:count]


def make_expert_tensor(plan: UpcyclePlan, spec: OutputTensor, dense):
    """An expert's tensor from the dense one: an exact copy, or with Drop-Upcycling the chosen
    neurons re-drawn from the dense weight's own mean and std (Nakamura et al., ICLR 2025)."""
    if plan.moe.drop_upcycling == 0 or spec.role not in ("in", "out"):
        return dense.clone()
    import torch

    tensor = dense.clone()
    intermediate = dense.shape[0] if spec.role == "in" else dense.shape[-1]
    index = dropped_neurons(plan, spec.layer, spec.expert, intermediate)
    if index.numel() == 0:
        return tensor
    g = _generator(plan.seed, 3, spec.layer, spec.expert, zlib.crc32(spec.name.encode()))
    stats = dense.float()
    mean, std = stats.mean().item(), stats.std().item() if stats.numel() > 1 else 0.0
    if spec.role == "in":  # rows (and bias entries) are intermediate neurons
        shape = (index.numel(), *dense.shape[1:])
        fresh = torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=g)
        tensor[index] = fresh.to(dense.dtype)
    elif dense.dim() == 2:  # out projection: columns are intermediate neurons
        fresh = torch.empty(dense.shape[0], index.numel()).normal_(mean, std, generator=g)
        tensor[:, index] = fresh.to(dense.dtype)
    return tensor


def upcycle_state_dict(dense: dict, plan: UpcyclePlan) -> dict:
    """The sparse state dict from a dense one (pure; for tests and small models)."""
    out = {}
    for spec in plan.tensors:
        if spec.kind == "copy":
            out[spec.name] = dense[spec.source]
        elif spec.kind == "router":
            import torch

            out[spec.name] = torch.from_numpy(init_router(plan, spec.layer))
        else:
            out[spec.name] = make_expert_tensor(plan, spec, dense[spec.source])
    return out


def check_dense_config(src: Path, config: dict) -> None:
    """Refuse a source whose config is not a dense VLM of a known base (``models.bases``)."""
    if is_sparse_model_type(config.get("model_type")) or "moe" in config:
        raise UpcycleError(
            f"{src} is already sparse (its config has a moe section); upcycle "
            "takes a dense checkpoint"
        )
    try:
        get_base(str(config.get("model_type")))
    except KeyError as err:
        raise UpcycleError(f"{src}: {err.args[0]}") from None
    if "text_config" not in config:
        raise UpcycleError(f"{src}: its config has no text_config (the language model's)")


def sparse_config(config: dict, plan: UpcyclePlan, src: Path) -> dict:
    """The sparse checkpoint's config: the dense ``config`` with the base's sparse model type,
    the ``moe`` section and the ``moetool`` block."""
    base = get_base(config["model_type"])
    out = dict(config)
    out["model_type"] = base.sparse_model_type
    out["architectures"] = ["MoE" + name for name in config.get("architectures") or []] or [
        "MoELlavaForConditionalGeneration"
    ]
    out["moe"] = plan.moe.to_dict()
    out["moetool"] = {
        "version": __version__,
        "stage": "upcycled",
        "source": str(src),
        # How the routers and experts were made is in `moe` (router_init, router_std,
        # drop_upcycling); the seed and the FFN layout found complete it.
        "upcycle": {"seed": plan.seed, "mlp_structure": plan.structure.name},
    }
    attention = checkpoint_attn_implementation(config)
    if attention is not None:  # the dense checkpoint's attention carries over
        out["moetool"]["attn_implementation"] = attention
    aspect_ratio = checkpoint_aspect_ratio(config)
    if aspect_ratio is not None:  # the dense model's; the copied processor is made to shape so
        out["moetool"]["image_aspect_ratio"] = aspect_ratio
    return out


def upcycle_checkpoint(
    src: str | Path,
    out: str | Path,
    moe: MoEConfig,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> UpcyclePlan:
    """Upcycle the dense checkpoint ``src`` into the sparse checkpoint ``out``.

    Streams tensor by tensor; written to a temporary directory renamed when complete. Files other
    than weights and config (tokenizer, processor, generation config) are copied unchanged.
    """
    with CheckpointTransform(src, out, UpcycleError, overwrite) as job:
        config = job.config
        check_dense_config(job.src, config)
        text = config["text_config"]
        mlp_key = get_base(config["model_type"]).mlp_key
        plan = plan_upcycle(
            job.entries, text["num_hidden_layers"], text["hidden_size"], moe, seed, mlp_key
        )
        dense_cache: dict = {}  # one dense FFN tensor while its experts are made (Drop-Upcycling)

        def source_tensor(name: str):  # torch is imported only for Drop-Upcycling
            if name not in dense_cache:
                dense_cache.clear()
                dense_cache[name] = job.read_tensor(name)
            return dense_cache[name]

        def write_tensor(spec: OutputTensor, f) -> None:
            exact_copy = spec.kind == "copy" or (
                spec.kind == "expert"
                and (plan.moe.drop_upcycling == 0 or spec.role not in ("in", "out"))
            )
            if exact_copy:
                job.copy_tensor(f, spec.source)
            elif spec.kind == "router":
                f.write(memoryview(init_router(plan, spec.layer)))
            else:
                tensor = make_expert_tensor(plan, spec, source_tensor(spec.source))
                f.write(tensor_bytes(tensor))

        job.write(
            plan.tensors,
            write_tensor,
            sparse_config(config, plan, job.src),
            finish=lambda tmp: carry_training_processor(tmp, checkpoint_aspect_ratio(config)),
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    return plan
