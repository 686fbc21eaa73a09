"""The tensors of an official checkpoint directory, read lazily (safetensors by byte range,
``.bin`` memory-mapped)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
    CheckpointError,
    SourceFiles,
    read_safetensors_header,
    tensor_bytes,
)
from moetool.convert.backbones import ConvertError
from moetool.convert.plan import ConvertedTensor

_TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class SourceCheckpoint:
    """The tensors of an official checkpoint directory, read lazily: safetensors (single or
    sharded) by byte range, or ``.bin`` (single or sharded) memory-mapped with
    ``torch.load(weights_only=True)``."""

    def __init__(self, src: Path):
        self.src = src
        self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._ranges: dict = {}
        self._tensors: dict = {}
        self._sources = SourceFiles()
        files = self._weight_files(src)
        origin: dict[str, Path] = {}
        for file in files:
            if file.suffix == ".safetensors":
                found = self._read_safetensors(file)
            else:
                found = self._read_bin(file)
            for name in found:
                if name in origin:
                    raise ConvertError(f"{name} is stored twice: in {origin[name]} and {file}")
                origin[name] = file

    @staticmethod
    def _weight_files(src: Path) -> list[Path]:
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (src / index).exists():
                try:
                    weight_map = json.loads((src / index).read_text())["weight_map"]
                except (ValueError, KeyError) as err:
                    raise ConvertError(f"{src / index}: not a weight index ({err})") from None
                files = [src / f for f in sorted(set(weight_map.values()))]
                absent = [f.name for f in files if not f.exists()]
                if absent:
                    raise ConvertError(f"{src / index} lists missing file(s): {', '.join(absent)}")
                return files
            if (src / single).exists():
                return [src / single]
        raise ConvertError(
            f"{src}: no weights (model.safetensors, pytorch_model.bin or their sharded indexes)"
        )

    def _read_safetensors(self, file: Path) -> list[str]:
        try:
            header = read_safetensors_header(file)
        except CheckpointError as err:
            raise ConvertError(str(err)) from None
        except (ValueError, OSError, KeyError, TypeError, struct.error) as err:
            raise ConvertError(f"{file}: not a safetensors file ({err})") from None
        for name, entry in header.items():
            if entry.dtype not in SAFETENSORS_DTYPE_BYTES:
                raise ConvertError(f"{file}: {name} has unsupported dtype {entry.dtype}")
            self.entries[name] = (entry.dtype, entry.shape)
            self._ranges[name] = entry
        return list(header)

    def _read_bin(self, file: Path) -> list[str]:
        import pickle
        import zipfile

        import torch

        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
        except (pickle.UnpicklingError, RuntimeError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise ConvertError(
                f"{file}: cannot be read with torch.load(weights_only=True) ({err})"
            ) from None
        if not isinstance(state, dict):
            raise ConvertError(f"{file}: holds a {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConvertError(f"{file}: {name} is a {type(tensor).__name__}, not a tensor")
            dtype = _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise ConvertError(f"{file}: {name} has unsupported dtype {tensor.dtype}")
            self.entries[name] = (dtype, tuple(tensor.shape))
            self._tensors[name] = tensor
        return list(state)

    def tensor(self, name: str):
        """One tensor, loaded (for tests and small models)."""
        if name in self._tensors:
            return self._tensors[name]
        from safetensors import safe_open

        entry = self._ranges[name]
        with safe_open(str(entry.file), "pt") as f:
            return f.get_tensor(name)

    def write(self, spec: ConvertedTensor, f) -> None:
        """Append the bytes of ``spec`` to the open file ``f``."""
        dtype, shape = self.entries[spec.source]
        row_bytes = math.prod(shape[1:]) * SAFETENSORS_DTYPE_BYTES[dtype]
        first, last = spec.rows if spec.rows is not None else (0, shape[0] if shape else 1)
        if spec.source in self._ranges:
            entry = self._ranges[spec.source]
            count = (last - first) * row_bytes if shape else entry.nbytes
            self._sources.copy(f, entry, first * row_bytes, count)
        else:
            tensor = self._tensors[spec.source]
            if spec.rows is not None:
                tensor = tensor[first:last]
            f.write(tensor_bytes(tensor))
        if spec.pad_rows:
            f.write(bytes(spec.pad_rows * row_bytes))

    def close(self) -> None:
        self._sources.close()
