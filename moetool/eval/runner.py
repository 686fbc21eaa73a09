"""``moetool eval``: lmms-eval's own task definitions on local data, results written as
``results.json``, ``results.csv`` and ``samples.jsonl`` (lmms-eval's per-sample log)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

from moetool.eval.tasks import EVAL_DTYPES, LMMS_TASKS, TASKS, get_task, splits, task_overrides
from moetool.io import UnsafeOverwriteError, check_overwrite
from moetool.models.attention import AttentionUnavailable
from moetool.models.inference import checkpoint_attention
from moetool.paper import BenchmarkFigures

# `--dtype` -> the torch dtype the model is loaded in.


class EvalError(ValueError):
    pass


@dataclass
class EvalReport:
    task: str
    metrics: dict[str, dict[str, float]]  # lmms-eval task -> metric -> value
    samples: int
    out: Path
    notes: list[str] = field(default_factory=list)
    # The paper's Table 3/4 row of the recipe the checkpoint was trained from (None: no row).
    paper: BenchmarkFigures | None = None
    dtype: str = "float32"  # what the model ran in
    world_size: int = 1  # ranks that answered a shard each
    # lmms-eval task -> {"split": the split of our data, "paper_split": the paper's figure's}
    splits: dict[str, dict[str, str | None]] = field(default_factory=dict)


def lmms_tasks(task: str) -> tuple[str, ...]:
    """The lmms-eval tasks behind a moetool task, as configured now (with or without a judge)."""
    return TASKS[task].lmms_tasks(judge_configured())


def judge_configured() -> bool:
    """Whether an MM-Vet judge is set up through lmms-eval's own settings."""
    api = os.environ.get("API_TYPE", "openai")
    return bool(os.environ.get("OPENAI_API_KEY")) or api not in ("openai", "dummy")


def check_data(task: str, data: Path) -> None:
    """One clear error for a missing directory or a dataset in the wrong schema."""
    from datasets import DatasetDict, load_from_disk

    try:
        get_task(task)
    except KeyError as err:
        raise EvalError(err.args[0]) from None
    if not data.is_dir():
        raise EvalError(f"--data {data}: no such directory")
    for lmms_task in lmms_tasks(task):
        spec = LMMS_TASKS[lmms_task]
        folder, splits = spec.data_folder, (spec.split,)
        path = data / folder
        if not path.is_dir():
            raise EvalError(
                f"--data {data}: no {folder}/ dataset for task {task} (expected a "
                "datasets.save_to_disk directory; `moetool data synth` writes one)"
            )
        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise EvalError(f"{path}: not a datasets.save_to_disk directory ({err})") from None
        if not isinstance(dataset, DatasetDict) or not set(splits) <= set(dataset):
            found = list(dataset) if isinstance(dataset, DatasetDict) else type(dataset).__name__
            raise EvalError(
                f"{path}: expected a DatasetDict with split(s) {list(splits)}, found {found}"
            )
        for split in splits:
            missing = [c for c in spec.columns if c not in dataset[split].column_names]
            if missing:
                raise EvalError(
                    f"{path} split {split!r}: missing column(s) {missing} of the {lmms_task} schema"
                )


def task_configs(task: str, data: Path) -> list[dict]:
    """lmms-eval dict task configs: the built-in YAML with only the data source replaced."""
    judge = judge_configured()
    return [task_overrides(t, data, judge) for t in lmms_tasks(task)]


def run_eval(
    task: str,
    model: str | Path,
    data: str | Path,
    out: str | Path,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    overwrite: bool = False,
    lmms_model=None,
    dtype: str = "fp32",
    attn_implementation: str | None = None,
) -> EvalReport | None:
    """Run ``task`` with lmms-eval on ``model`` (a checkpoint directory) and local ``data``,
    the model loaded in ``dtype`` (``fp32`` or ``bf16``), attending with
    ``attn_implementation`` (None: the one the checkpoint was trained with).

    ``lmms_model`` replaces the checkpoint's model with another lmms-eval model instance (tests
    use an oracle). Writes ``out/results.json``, ``out/results.csv`` and ``out/samples.jsonl``.
    Launched by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), every process answers a shard
    of the samples and rank 0 gathers, scores, writes and returns the report; the other ranks
    return None.
    """
    data, out = Path(data), Path(out)
    if dtype not in EVAL_DTYPES:
        raise EvalError(f"--dtype {dtype}: expected one of {', '.join(EVAL_DTYPES)}")
    if lmms_model is None:  # first: it reads only the checkpoint's config
        try:
            attn_implementation = checkpoint_attention(
                model, attn_implementation, device, EVAL_DTYPES[dtype], "--dtype"
            )
        except AttentionUnavailable as err:
            raise EvalError(str(err)) from None
    check_data(task, data)
    if lmms_model is None and not (Path(model) / "config.json").is_file():
        raise EvalError(f"--model {model}: not a checkpoint directory (no config.json)")
    inputs = [data] if lmms_model is not None else [model, data]
    try:
        check_overwrite(out, inputs)
    except UnsafeOverwriteError as err:
        raise EvalError(str(err)) from None
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvalError(f"{out} already holds results (pass --overwrite to replace them)")
    # Offline hub access, and a dummy judge API for MM-Vet without one: set for the evaluation
    # only, never left in the caller's environment.
    environment = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
    }
    notes = []
    if task == "mmbench" and not judge_configured():
        notes.append(
            "No GPT judge configured: MMBench answers are matched to the options by "
            "rules (lmms-eval's mmbench_en_dev_static)."
        )
    if task == "mmvet" and not judge_configured():
        environment["API_TYPE"] = "dummy"  # lets the task import without credentials
        notes.append(
            "MM-Vet scores need a GPT judge: none is configured (set OPENAI_API_KEY "
            "and optionally OPENAI_API_URL / MODEL_VERSION, or API_TYPE), so "
            "predictions are written and every score is 0.0 (not judged)."
        )

    notes += [LMMS_TASKS[t].split_note for t in lmms_tasks(task) if LMMS_TASKS[t].split_note]
    import torch.distributed as dist

    joined = dist.is_initialized()
    try:
        with _environment(environment):
            return _evaluate(
                task, model, data, out, inputs, limit, batch_size, device, lmms_model, notes,
                EVAL_DTYPES[dtype], attn_implementation,
            )  # fmt: skip
    finally:
        if dist.is_initialized() and not joined:
            dist.destroy_process_group()  # the group this evaluation joined


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _evaluate(
    task, model, data, out, inputs, limit, batch_size, device, lmms_model, notes, dtype, attention
) -> EvalReport | None:
    import lmms_eval
    import torch.distributed as dist
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from moetool.io import atomic_output_dir, held_output

    if lmms_model is None:
        from moetool.eval.lmms_model import MoeTool

        try:
            lmms_model = MoeTool(
                pretrained=str(model),
                device=device,
                batch_size=batch_size,
                dtype=dtype,
                attn_implementation=attention,
            )
        except ValueError as err:  # a device that the ranks cannot share
            raise EvalError(str(err)) from None
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(lmms_eval.__file__).parent / "tasks"
    folders = sorted({LMMS_TASKS[t].yaml_folder for t in lmms_tasks(task)})
    manager = TaskManager(
        include_path=[str(root / f) for f in folders], include_defaults=False, model_name="moetool"
    )
    # Only rank 0 writes the results; the others answer their shard with a scratch directory.
    output = (
        atomic_output_dir(out, overwrite=True, inputs=inputs)
        if rank == 0
        else tempfile.TemporaryDirectory(prefix=f"moetool-eval-rank{rank}-")
    )
    with output as tmp:
        tmp = Path(tmp)
        # lmms-eval's progress bars (some ignore TQDM_DISABLE) and warnings: a log beside the
        # results, not the command's output.
        with held_output("stderr") as lmms_log:
            # lmms-eval shards the documents by rank (rank r answers documents r, r + W, ...),
            # pads the shorter shards, and gathers the logged samples and per-sample metrics to
            # rank 0, which alone aggregates. "torchrun": torch.distributed collectives on the
            # process group the model joined, without an accelerate Accelerator.
            result = evaluator.simple_evaluate(
                model=lmms_model,
                tasks=task_configs(task, data),
                task_manager=manager,
                limit=limit,
                device=device,
                log_samples=True,
                bootstrap_iters=0,
                batch_size=batch_size,
                distributed_executor_backend="torchrun",
                cli_args=types.SimpleNamespace(output_path=str(tmp), process_with_media=False),
            )
        if rank != 0:
            return None
        (tmp / "lmms_eval.log").write_text(lmms_log.getvalue())
        samples = result.pop("samples", {})
        task_splits = splits(lmms_tasks(task))
        result["moetool"] = {
            "dtype": dtype,
            "world_size": world_size,
            "batch_size": batch_size,
            "attn_implementation": attention,
            "splits": task_splits,
        }
        (tmp / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        with (tmp / "samples.jsonl").open("w") as f:
            for lmms_task, rows in samples.items():
                # Gathered shard by shard (rank 0's documents, then rank 1's, ...): in document
                # order again, as one process logs them.
                for row in sorted(rows, key=lambda r: r["doc_id"]):
                    f.write(json.dumps({"task": lmms_task, **row}, default=str) + "\n")
        metrics = {
            t: {
                m: float(result["results"][t][f"{m},none"])
                for m in LMMS_TASKS[t].metrics
                if result["results"][t].get(f"{m},none") is not None
            }
            for t in lmms_tasks(task)
        }
        for lmms_task, rows in samples.items():
            if lmms_task in TASKS["pope"].lmms and rows:
                # The paper's "Yes" (Table 4) is the share of *answers* that are yes;
                # lmms-eval's pope_yes_ratio is the share of yes in the ground truth.
                answers = [row["pope_accuracy"]["prediction"] for row in rows]
                metrics[lmms_task]["yes_ratio_predicted"] = answers.count("yes") / len(answers)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with (tmp / "results.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "metric", "value"])
            for lmms_task, values in metrics.items():
                for metric, value in values.items():
                    writer.writerow([lmms_task, metric, value])
    count = sum(len(rows) for rows in samples.values())
    config = Path(model) / "config.json"
    paper = paper_figures(json.loads(config.read_text())) if config.is_file() else None
    return EvalReport(task, metrics, count, out, notes, paper, dtype, world_size, task_splits)


def paper_figures(checkpoint_config: dict):
    """The paper's Table 3/4 row (``moetool.paper.BenchmarkFigures``) of the recipe a checkpoint
    was trained from, found by the recipe name its config records; None for other recipes."""
    from moetool.paper import TABLE3_4
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import resolve_recipe

    name = ((checkpoint_config.get("moetool") or {}).get("recipe") or {}).get("name")
    if not name:
        return None
    return next((r for r in TABLE3_4 if load_recipe(resolve_recipe(r.recipe)).name == name), None)
