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

from moetool.io import describe_write_error
from moetool.train.engine import TrainingError, full_state_dict
from moetool.train.ranks import failures_on_any_rank

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
    """What makes two runs of a stage the same run: the recipe (less the saving keys and the
    attention implementation), the stage, the contents of its data files, the world size and
    the starting checkpoint."""
    recipe = json.loads(json.dumps(recipe_dict))  # a deep copy of plain data
    for section in recipe.get("stages", {}).values():
        for key in _NOT_THE_RUN:
            section.pop(key, None)
    recipe.get("data", {}).pop("num_workers", None)
    # The attention kernel computes the same attention: a run may resume on other hardware.
    recipe.get("model", {}).pop("attn_implementation", None)
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


# --- writing and resuming (DeepSpeed, every rank) ------------------------------------------


def resume_point(root: Path, run: dict) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root`` if it belongs to ``run``; None when there
    is none at all (the stage starts from the beginning)."""
    complete = complete_checkpoints(root)
    if not complete:
        partial = checkpoint_dirs(root)
        if partial:
            names = ", ".join(p.name for _, p in partial)
            raise TrainingError(
                f"--resume: no complete checkpoint in {root} ({names} were not finished, or were "
                "written by a moetool without checkpoint fingerprints); pass --overwrite without "
                "--resume to start the stage again"
            )
        return None
    step, path = complete[-1]
    saved = read_marker(path).get("fingerprint", {})
    changed = differences(saved, run)
    if changed:
        raise TrainingError(
            f"--resume: the checkpoint {path} belongs to another run of this stage; it differs "
            f"in {'; '.join(changed[:6])}{' …' if len(changed) > 6 else ''}. Resume with what it "
            "was trained with, or pass --overwrite without --resume to start again"
        )
    return step, path


def save_checkpoint(
    engine, root: Path, step: int, run: dict, keep: int, pending: str | None = None
) -> str | None:
    """DeepSpeed checkpoint ``step-N``; complete (marked) once every rank has written its part;
    older ones beyond ``keep`` removed. A write that fails on any rank (a full disk, a read-only
    folder) is returned on every rank as one message, and the unfinished ``step-N`` removed;
    ``pending`` is an earlier failure of rank 0 that must stop the ranks here too."""
    import torch

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    target = root / f"step-{step}"
    problem = None
    if rank == 0:  # DeepSpeed creates the folder on rank 0 before its first collective
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"could not write checkpoint {target}: {describe_write_error(err)}"
    failed = failures_on_any_rank(problem or pending, rank, world)
    if failed:
        return failed
    try:
        engine.save_checkpoint(str(root), tag=target.name, client_state={"step": step})
    except Exception as err:
        problem = f"could not write checkpoint {target}: {describe_write_error(err)}"
        # DeepSpeed's save ends in a barrier that the other ranks wait in: meet them there.
        torch.distributed.barrier()
    failed = failures_on_any_rank(problem, rank, world)
    if rank == 0:
        if failed:
            shutil.rmtree(target, ignore_errors=True)
        else:
            mark_complete(target, run, step)
            prune(root, keep)
    torch.distributed.barrier()
    return failed


def keep_trained_state(engine, root: Path, step: int, run: dict, keep: int) -> str:
    """After a failed final write: save the trained state as checkpoint ``step-N`` (from which
    ``--resume`` writes the final checkpoint without training again) and say where it is; if that
    fails too, name the last good checkpoint."""
    if any(saved == step for saved, _ in complete_checkpoints(root)):
        failed = None  # a resumed run that failed to write again: its checkpoint is still there
    else:
        failed = save_checkpoint(engine, root, step, run, keep)
    if not failed:
        return (
            f"the trained state (step {step}) is kept in {root / f'step-{step}'}: run the same "
            "command with --resume to write the final checkpoint from it"
        )
    return f"keeping the trained state failed too ({failed}); " + last_good_checkpoint(root)


def last_good_checkpoint(root: Path) -> str:
    """Where a failed stage can resume from, in words."""
    complete = complete_checkpoints(root)
    if not complete:
        return "no checkpoint was saved (set save_steps to keep some)"
    return f"the last good checkpoint is {complete[-1][1]} (--resume continues from it)"


def training_plan(engine, world: int) -> dict:
    """How the stage's global batch was made and which optimizer stepped it (the final
    checkpoint's ``moetool.training``): per-device batch x world x accumulation."""
    return {
        "world_size": world,
        "per_device_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "global_batch_size": engine.train_batch_size(),
        "optimizer": type(engine.basic_optimizer).__name__,
    }


def final_outputs(out: Path, lora_save: str | None) -> list[Path]:
    """What a stage's final save writes: its checkpoint ``out`` and, for a stage with adapters,
    ``<out>-adapter`` as ``lora.save`` says (the merged checkpoint first)."""
    adapter = out.with_name(f"{out.name}-adapter")
    return {None: [out], "merged": [out], "adapter": [adapter], "both": [out, adapter]}[lora_save]


def save_final(
    engine,
    model,
    processor,
    out: Path,
    overwrite: bool,
    dtype,
    provenance: dict,
    template: str,
    pending: str | None = None,
    lora_save: str | None = None,
) -> str | None:
    """The final HF checkpoint in ``dtype``, written by rank 0 into a temporary folder and
    renamed; its config's ``moetool`` block is ``provenance`` (version, stage, recipe) and the
    training plan, its tokenizer carries the chat ``template`` (none: the processor's own). A
    stage with adapters (``model`` is a peft model) writes, as ``lora_save`` says, the merged
    checkpoint (an ordinary one) and or the peft adapter in ``<out>-adapter``. Returns the
    agreed error of every rank when it could not be written (nothing of it is left)."""
    import torch

    from moetool.data.templates import get_template
    from moetool.io import atomic_output_dir, check_free_space

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    partitioned = engine.zero_optimization_stage() == 3
    state_dict = full_state_dict(engine.module, dtype, rank, partitioned)
    plain, plain_state = model, state_dict
    if lora_save == "adapter":
        plain = model.get_base_model()  # whose config the adapter's checkpoint records
    elif lora_save is not None:
        from moetool.models.lora import merged_state_dict, plain_model

        plain_state = merged_state_dict(model, state_dict, dtype, rank, partitioned)
        plain = plain_model(model) if rank == 0 else None
    problem = pending
    if rank == 0 and problem is None:
        written = final_outputs(out, lora_save)
        try:
            check_free_space(out.parent, sum(t.nbytes for t in plain_state.values()))
            plain.config.use_cache = plain.config.get_text_config().use_cache = True
            plain.config.moetool = {**provenance, "training": training_plan(engine, world)}
            if template:  # a whole VLM keeps its own chat template
                get_template(template).attach(processor)
            if out in written:
                with atomic_output_dir(out, overwrite) as tmp:
                    plain.save_pretrained(tmp, state_dict=plain_state)
                    processor.save_pretrained(tmp)
            if lora_save in ("adapter", "both"):
                with atomic_output_dir(written[-1], overwrite) as tmp:
                    model.save_pretrained(tmp, state_dict=state_dict)
                    processor.save_pretrained(tmp)
        except Exception as err:  # the disk, a quota, permissions: say so on every rank
            problem = f"could not write the final checkpoint {out}: {describe_write_error(err)}"
    del state_dict, plain_state
    return failures_on_any_rank(problem, rank, world)
