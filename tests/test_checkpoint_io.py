"""Tensor-by-tensor safetensors I/O against the safetensors and huggingface_hub libraries."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.checkpoint_io import (
    SourceFiles,
    read_checkpoint_index,
    read_safetensors_header,
    tensor_bytes,
    write_sharded_safetensors,
)


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sizes = {"a": 300, "b": 100, "c": 900, "d": 50, "e": 400, "f": 10}
    return {name: torch.randn(n) for name, n in sizes.items()}


def write(directory, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    specs = [Spec(k, "F32", tuple(v.shape), v.numel() * 4) for k, v in state.items()]
    return write_sharded_safetensors(
        directory, specs, lambda spec, f: f.write(tensor_bytes(state[spec.name])), max_bytes
    )


def test_shards_are_split_as_save_pretrained_splits_them(tmp_path):
    state = tensors()
    names = write(tmp_path, state, max_bytes=2000)
    reference = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=2000
    )
    assert names == list(reference.filename_to_tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == reference.tensor_to_filename
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    for name in names:
        with safe_open(str(tmp_path / name), "pt") as f:
            assert len(f.keys()) and all(torch.equal(f.get_tensor(k), state[k]) for k in f.keys())  # noqa: SIM118


def test_one_shard_has_no_index(tmp_path):
    assert write(tmp_path, tensors(), max_bytes=10**9) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_header_offsets_address_each_tensors_bytes(tmp_path):
    state = {"x": torch.arange(6, dtype=torch.float16).reshape(2, 3), "y": torch.ones(4)}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    entries = read_safetensors_header(tmp_path / "model.safetensors")
    assert read_checkpoint_index(tmp_path) == entries
    assert entries["x"].dtype == "F16" and entries["x"].shape == (2, 3)
    out = tmp_path / "copy.bin"
    with SourceFiles() as files, open(out, "wb") as f:
        for name in ("y", "x"):
            files.copy(f, entries[name])
    assert out.read_bytes() == bytes(tensor_bytes(state["y"])) + bytes(tensor_bytes(state["x"]))


def test_progress_counts_every_tensors_bytes_in_write_order(tmp_path):
    state = tensors()
    specs = [Spec(k, "F32", tuple(v.shape), v.numel() * 4) for k, v in state.items()]
    calls = []
    write_sharded_safetensors(
        tmp_path,
        specs,
        lambda spec, f: f.write(tensor_bytes(state[spec.name])),
        2000,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = sum(s.nbytes for s in specs)
    assert len(calls) == len(specs) and all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total and done[0] > 0
