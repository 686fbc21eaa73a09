"""A stage's training checkpoints: what run wrote them, which are complete, which to keep.

DeepSpeed writes ``<state>/checkpoints/step-N/`` (one file per rank) and then a ``latest`` file,
neither atomically. After every rank has saved, rank 0 writes ``step-N/moetool.json`` (the run's
fingerprint and the step) by rename: a checkpoint without it is incomplete. ``--resume`` takes
the newest complete checkpoint, whatever ``latest`` says, and only if its fingerprint matches
the run being resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MARKER = "moetool.json"
_TAG = re.compile(r"^step-(\d+)$")
# Recipe keys that change how a run is saved or reported, not what it computes.
_NOT_THE_RUN = ("save_steps", "save_total_limit")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(
    recipe_dict: dict,
    stage: str,
    data_files: list[Path],
    world_size: int,
    init: Path | None,
) -> dict:
    """What makes two runs of a stage the same run: the recipe (less the saving keys), the
    stage, the contents of its data files, the world size and the starting checkpoint."""
    recipe = json.loads(json.dumps(recipe_dict))  # a deep copy of plain data
    for section in recipe.get("stages", {}).values():
        for key in _NOT_THE_RUN:
            section.pop(key, None)
    recipe.get("data", {}).pop("num_workers", None)
    recipe.pop("tracking", None)  # where metrics are reported is not what the run computes
    start = None
    if init is not None:
        config = init / "config.json"
        start = {
            "path": str(init.resolve()),
            "config_sha256": file_digest(config) if config.is_file() else None,
        }
    return {
        "stage": stage,
        "recipe": recipe,
        "data": {str(p): file_digest(p) for p in data_files},
        "world_size": world_size,
        "init": start,
    }


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: saved -> current``."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, f"{name}."))
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "…" + text[-8:]


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    return [(step, p) for step, p in checkpoint_dirs(root) if (p / MARKER).is_file()]


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def mark_complete(path: Path, run: dict, step: int) -> None:
    """Rank 0, after every rank has saved: the checkpoint is complete."""
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "fingerprint": run}, indent=1) + "\n")
    os.replace(tmp, path / MARKER)


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (0 keeps all) and every
    incomplete one older than the newest complete one. Returns what it removed."""
    complete = complete_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep]] if keep else []
    doomed += [
        p for step, p in checkpoint_dirs(root) if step < newest and not (p / MARKER).exists()
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to ``step`` (a resumed run writes the rest again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
