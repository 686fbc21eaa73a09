"""Safetensors checkpoints read and written tensor by tensor, without holding a model: the
header index of a checkpoint directory (where each tensor's bytes are), a writer whose header is
known in advance, sharding with an index (huggingface_hub's splitter), and byte-range copies
done by the kernel (why the header is read here: ``safetensors.safe_open`` does not give a
tensor's byte offsets), and ``CheckpointTransform``: the skeleton of ``upcycle``, ``convert``
and ``export``, which each turn one checkpoint directory into another tensor by tensor."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from moetool.io import OutputExistsError, UnsafeOverwriteError, atomic_output_dir, check_overwrite


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as safetensors."""


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


class TensorSpec(Protocol):
    """What the writers need of a tensor to write: its name, dtype, shape and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


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


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.fstat(f.fileno()).st_size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header longer than the file)")
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
        raise CheckpointError(f"{src}: no safetensors weights{hint}")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        entries.update(read_safetensors_header(src / name))
    return entries


def copy_range(src_fd: int, dst, begin: int, count: int) -> None:
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
    specs: list[TensorSpec],
    write_tensor: Callable[[TensorSpec, object], None],
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
                raise CheckpointError(
                    f"{spec.name}: wrote {f.tell() - start} bytes, expected {spec.nbytes}"
                )


def write_sharded_safetensors(
    directory: Path,
    specs: Iterable[TensorSpec],
    write_tensor: Callable[[TensorSpec, object], None],
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` (a larger tensor alone in
    its own) plus ``model.safetensors.index.json``, in ``directory``, split as
    ``save_pretrained`` splits (huggingface_hub's splitter); returns the file names.
    ``progress(bytes_written, bytes_total)`` is called after each tensor."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {spec.name: spec for spec in specs}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda spec: spec.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    total = sum(spec.nbytes for spec in by_name.values())
    written = 0

    def write_and_count(spec: TensorSpec, f) -> None:
        nonlocal written
        write_tensor(spec, f)
        written += spec.nbytes
        if progress:
            progress(written, total)

    for name, tensors in split.filename_to_tensors.items():
        write_safetensors(directory / name, [by_name[t] for t in tensors], write_and_count)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return list(split.filename_to_tensors)


def tensor_bytes(tensor) -> memoryview:
    import torch

    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


class SourceFiles:
    """The files of a source checkpoint, each opened once, for byte-range copies of its tensors
    (``copy_range``); closed when the ``with`` block ends."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def copy(self, f, entry: TensorEntry, offset: int = 0, count: int | None = None) -> None:
        """Append ``count`` bytes of ``entry`` from ``offset`` (default: all of it) to ``f``."""
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        copy_range(fd, f, entry.begin + offset, entry.nbytes - offset if count is None else count)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copy_side_files(src: Path, dst: Path) -> None:
    """Everything of checkpoint ``src`` but its weights and config (tokenizer, processor, chat
    template, generation config), into ``dst``."""
    for item in src.iterdir():
        weights = item.name.endswith(WEIGHT_SUFFIXES) or item.name in WEIGHT_INDEXES
        if weights or item.name == "config.json":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


class CheckpointTransform:
    """One checkpoint directory turned into another, tensor by tensor: the steps ``upcycle``,
    ``convert`` and ``export`` share. Opening checks the source (a directory with a
    ``config.json`` object, read into ``config``) and refuses an ``out`` that exists (without
    ``overwrite``) or is or contains an input; ``write`` streams the tensors into a temporary
    directory beside ``out``, writes the config and side files there and renames it when
    complete; the source files are closed when the ``with`` block ends. Each command supplies
    what is its own: its plan's tensors, how each one's bytes are written, its config, extra
    files. Every refusal is raised as ``error`` (the command's exception class) with the path."""

    def __init__(
        self,
        src: str | Path,
        out: str | Path,
        error: Callable[[str], Exception],
        overwrite: bool = False,
        inputs: Iterable[str | Path | None] = (),
    ) -> None:
        self.src, self.out = Path(src), Path(out)
        self.error = error
        self.overwrite = overwrite
        self.inputs = [self.src, *inputs]
        if not self.src.is_dir():
            raise error(f"{self.src}: no such checkpoint directory")
        if self.out.exists() and not overwrite:
            raise error(f"{self.out} already exists (pass --overwrite to replace it)")
        try:
            check_overwrite(self.out, self.inputs)
        except UnsafeOverwriteError as err:
            raise error(str(err)) from None
        self.config: dict = self._read_config()
        self.sources = SourceFiles()
        self._entries: dict[str, TensorEntry] | None = None
        self._readers: dict[Path, object] = {}
        self._opened = ExitStack()  # files read as tensors, and what the command asks to close

    def _read_config(self) -> dict:
        file = self.src / "config.json"
        try:
            config = json.loads(file.read_text())
        except FileNotFoundError:
            raise self.error(f"{self.src}: not a checkpoint directory (no config.json)") from None
        except ValueError as err:
            raise self.error(f"{file}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise self.error(f"{file}: not a JSON object")
        return config

    @property
    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor of the source's safetensors weights (its index, read on first use)."""
        if self._entries is None:
            try:
                self._entries = read_checkpoint_index(self.src)
            except CheckpointError as err:
                raise self.error(str(err)) from None
            except ValueError as err:  # an index or header that is not JSON
                raise self.error(f"{self.src}: {err}") from None
        return self._entries

    def copy_tensor(self, f, name: str) -> None:
        """Append the bytes of source tensor ``name`` to ``f`` (a byte-range copy)."""
        self.sources.copy(f, self.entries[name])

    def read_tensor(self, name: str):
        """Source tensor ``name``, loaded (imports torch): for tensors a command computes."""
        entry = self.entries[name]
        if entry.file not in self._readers:
            from safetensors import safe_open

            reader = self._opened.enter_context(safe_open(str(entry.file), framework="pt"))
            self._readers[entry.file] = reader
        return self._readers[entry.file].get_tensor(name)

    def close_with(self, close: Callable[[], object]) -> None:
        """Call ``close`` when the source files are closed (a command's own source reader)."""
        self._opened.callback(close)

    def write(
        self,
        tensors: Iterable[TensorSpec],
        write_tensor: Callable[[TensorSpec, object], None],
        config: dict | object,
        side_files: bool = True,
        finish: Callable[[Path], None] | None = None,
        max_shard_bytes: int = 5 * 1024**3,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Write the output: ``tensors`` (``write_tensor(spec, file)`` appends each one's
        bytes; sharded as ``write_sharded_safetensors`` does), ``config`` (a dict, or a
        transformers config written by its ``save_pretrained``), the source's side files
        unless not ``side_files`` (``copy_side_files``), then ``finish(directory)`` for the
        command's own; all in a temporary directory that replaces ``out`` when complete."""
        try:
            with atomic_output_dir(self.out, self.overwrite, inputs=self.inputs) as tmp:
                write_sharded_safetensors(tmp, tensors, write_tensor, max_shard_bytes, progress)
                if isinstance(config, dict):
                    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                else:
                    config.save_pretrained(tmp)
                if side_files:
                    copy_side_files(self.src, tmp)
                if finish is not None:
                    finish(tmp)
        except (UnsafeOverwriteError, OutputExistsError) as err:  # out changed since opening
            raise self.error(str(err)) from None

    def close(self) -> None:
        self.sources.close()
        self._readers.clear()
        self._opened.close()

    def __enter__(self) -> CheckpointTransform:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
