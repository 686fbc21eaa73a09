"""Dense LVLM -> sparse LVLM: copy each chosen FFN into E experts and add a router.

The maths is in pure functions (``plan_upcycle``, ``upcycle_state_dict``); ``upcycle_checkpoint``
streams a safetensors checkpoint tensor by tensor: FFN and other tensors are copied byte ranges
(``copy_file_range``), so the whole model is never in memory; only routers and Drop-Upcycled
experts are computed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from moetool import __version__
from moetool.io import UnsafeOverwriteError, atomic_output_dir, check_overwrite
from moetool.models.moe.config import MoEConfig, MoEConfigError

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Language-model FFN parameters: `<prefix>language_model<...>layers.<i>.mlp.<rest>`.
_MLP_KEY = re.compile(
    r"^(?P<prefix>.*language_model\.(?:model\.)?layers\.)(?P<layer>\d+)"
    r"\.mlp\.(?P<rest>.+)$"
)


class UpcycleError(ValueError):
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
class TensorEntry:
    """A tensor inside a safetensors file: where its bytes are, without reading them."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


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


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.fstat(f.fileno()).st_size - 8:
            raise UpcycleError(f"{path}: not a safetensors file (header longer than the file)")
        header = json.loads(f.read(length))
    base = 8 + length
    return {
        name: TensorEntry(
            path,
            info["dtype"],
            tuple(info["shape"]),
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_checkpoint_index(src: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = [p.name for p in src.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
        hint = (
            f" (found {', '.join(found)}: re-save it with safetensors, e.g. "
            "save_pretrained(..., safe_serialization=True))"
            if found
            else ""
        )
        raise UpcycleError(f"{src}: no safetensors weights{hint}")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        entries.update(read_safetensors_header(src / name))
    return entries


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
) -> UpcyclePlan:
    """Which output tensor comes from which dense tensor. ``entries`` maps names to
    ``TensorEntry`` or ``(dtype, shape)``; order of the output follows the input."""
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
        match = _MLP_KEY.match(name)
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


def _copy_range(src_fd: int, dst, begin: int, count: int) -> None:
    dst.flush()
    dst_fd = dst.fileno()
    offset = begin
    remaining = count
    try:
        while remaining:
            done = os.copy_file_range(src_fd, dst_fd, remaining, offset)
            if done == 0:
                raise OSError("copy_file_range copied nothing")
            offset += done
            remaining -= done
    except (OSError, AttributeError):
        while remaining:  # portable fallback, 64 MiB at a time
            chunk = os.pread(src_fd, min(remaining, 1 << 26), offset)
            dst.write(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
    dst.seek(0, os.SEEK_END)


def write_safetensors(
    path: Path,
    specs: list[OutputTensor],
    write_tensor: Callable[[OutputTensor, object], None],
    metadata: dict | None = None,
) -> None:
    """Write a safetensors file whose header is known in advance; ``write_tensor(spec, file)``
    appends each tensor's bytes in order."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            start = f.tell()
            write_tensor(spec, f)
            if f.tell() - start != spec.nbytes:
                raise UpcycleError(
                    f"{spec.name}: wrote {f.tell() - start} bytes, expected {spec.nbytes}"
                )


def _shards(specs: Iterable[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_sharded_safetensors(
    directory: Path,
    specs: Iterable[OutputTensor],
    write_tensor: Callable[[OutputTensor, object], None],
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """``model.safetensors``, or numbered shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``, in ``directory``; returns the file names."""
    specs = list(specs)
    shards = _shards(specs, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(directory / name, shard, write_tensor)
    if len(shards) > 1:
        weight_map = {
            spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard
        }
        total = sum(spec.nbytes for spec in specs)
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return names


def _tensor_bytes(tensor) -> memoryview:
    import torch

    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def load_source_config(src: Path) -> dict:
    config_file = src / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise UpcycleError(f"{src}: not a checkpoint directory (no config.json)") from None
    except ValueError as err:
        raise UpcycleError(f"{config_file}: not valid JSON ({err})") from None
    if config.get("model_type") == "moetool_llava" or "moe" in config:
        raise UpcycleError(
            f"{src} is already sparse (its config has a moe section); upcycle "
            "takes a dense checkpoint"
        )
    if config.get("model_type") != "llava" or "text_config" not in config:
        raise UpcycleError(
            f"{src}: expected a transformers LLaVA checkpoint (model_type "
            f"'llava'), got model_type {config.get('model_type')!r}"
        )
    return config


def upcycle_checkpoint(
    src: str | Path,
    out: str | Path,
    moe: MoEConfig,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> UpcyclePlan:
    """Upcycle the dense LLaVA checkpoint ``src`` into the sparse checkpoint ``out``.

    Streams tensor by tensor; written to a temporary directory renamed when complete. Files other
    than weights and config (tokenizer, processor, generation config) are copied unchanged.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UpcycleError(f"{src}: no such checkpoint directory")
    if out.exists() and not overwrite:
        raise UpcycleError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        check_overwrite(out, [src])
    except UnsafeOverwriteError as err:
        raise UpcycleError(str(err)) from None
    config = load_source_config(src)
    text = config["text_config"]
    entries = read_checkpoint_index(src)
    plan = plan_upcycle(entries, text["num_hidden_layers"], text["hidden_size"], moe, seed)

    total = sum(spec.nbytes for spec in plan.tensors)
    written = 0
    fds: dict[Path, int] = {}
    handles: dict[Path, object] = {}
    dense_cache: dict = {}  # one dense FFN tensor while its experts are made (Drop-Upcycling)

    def source_tensor(name: str):
        from safetensors import safe_open  # torch is imported only for Drop-Upcycling

        if name not in dense_cache:
            dense_cache.clear()
            entry = entries[name]
            if entry.file not in handles:
                handles[entry.file] = safe_open(str(entry.file), "pt")
            dense_cache[name] = handles[entry.file].get_tensor(name)
        return dense_cache[name]

    def write_tensor(spec: OutputTensor, f) -> None:
        nonlocal written
        exact_copy = spec.kind == "copy" or (
            spec.kind == "expert"
            and (plan.moe.drop_upcycling == 0 or spec.role not in ("in", "out"))
        )
        if exact_copy:
            entry = entries[spec.source]
            if entry.file not in fds:
                fds[entry.file] = os.open(entry.file, os.O_RDONLY)
            _copy_range(fds[entry.file], f, entry.begin, entry.nbytes)
        elif spec.kind == "router":
            f.write(memoryview(init_router(plan, spec.layer)))
        else:
            tensor = make_expert_tensor(plan, spec, source_tensor(spec.source))
            f.write(_tensor_bytes(tensor))
        written += spec.nbytes
        if progress:
            progress(written, total)

    try:
        with atomic_output_dir(out, overwrite, inputs=[src]) as tmp:
            write_sharded_safetensors(tmp, plan.tensors, write_tensor, max_shard_bytes)
            sparse_config = dict(config)
            sparse_config["model_type"] = "moetool_llava"
            sparse_config["architectures"] = ["MoELlavaForConditionalGeneration"]
            sparse_config["moe"] = plan.moe.to_dict()
            sparse_config["moetool"] = {
                "version": __version__,
                "stage": "upcycled",
                "source": str(src),
                # How the routers and experts were made is in `moe` (router_init, router_std,
                # drop_upcycling); the seed and the FFN layout found complete it.
                "upcycle": {"seed": plan.seed, "mlp_structure": plan.structure.name},
            }
            (tmp / "config.json").write_text(json.dumps(sparse_config, indent=2) + "\n")
            for item in src.iterdir():
                if (
                    item.name == "config.json"
                    or item.name.endswith(WEIGHT_SUFFIXES)
                    or item.name in WEIGHT_INDEXES
                ):
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
    finally:
        for fd in fds.values():
            os.close(fd)
    return plan
