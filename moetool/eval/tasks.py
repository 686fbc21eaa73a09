"""The evaluation task table: what each moetool task runs in lmms-eval, where its local data
lives, which columns and metrics it has, what replaces lmms-eval's settings for local data, and
which paper figure it compares with. The runner, the dataset writer, the CLI and routing
capture read it; nothing else names an lmms-eval task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moetool.paper import PAPER_SPLITS

# `moetool eval --dtype`: the name on the command line and the torch dtype it loads in.
EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# Columns each dataset's lmms-eval hooks read.
_POPE_COLUMNS = ("image", "question", "answer", "question_id")
_POPE_METRICS = ("pope_accuracy", "pope_f1_score", "pope_yes_ratio")


@dataclass(frozen=True)
class LmmsTask:
    """One lmms-eval task as moetool runs it on local data."""

    name: str  # lmms-eval's task name
    yaml_folder: str  # folder of its built-in YAML under lmms_eval/tasks
    data_folder: str  # the datasets.save_to_disk folder under --data
    split: str  # the split of that folder it reads
    columns: tuple[str, ...]  # columns its hooks read
    metrics: tuple[str, ...]  # lmms-eval metrics we report
    # The paper's figure it compares with: ("table3", column) or ("table4", POPE sampling).
    paper: tuple[str, str] | None = None
    # Settings replaced for local data: GQA's image-joining hook would download the images.
    local: dict = field(default_factory=dict)
    # ... and, when no GPT judge is configured, what replaces the judge's scoring.
    unjudged_local: dict = field(default_factory=dict)
    # Said in the report where the paper's figure comes from another split than ours.
    split_note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """A moetool task: the lmms-eval tasks it runs, with and without a GPT judge."""

    name: str
    lmms: tuple[str, ...]
    unjudged: tuple[str, ...] | None = None  # run instead when no judge is configured

    def lmms_tasks(self, judge: bool) -> tuple[str, ...]:
        return self.lmms if judge or self.unjudged is None else self.unjudged


def mmvet_without_judge(doc, results):
    """MM-Vet's per-sample record with the prediction kept and no judge score (0.0)."""
    return {
        "gpt_eval_score": {
            "question_id": doc["question_id"],
            "question": doc["question"],
            "gt_answer": doc["answer"],
            "capabilities": doc["capability"],
            "pred_answer": results[0],
            "score": 0.0,
            "eval_model": "none",
        }
    }


LMMS_TASKS: dict[str, LmmsTask] = {
    t.name: t
    for t in (
        # The plain `pope` task reads one test split: the three samplings together, as the hub's.
        LmmsTask("pope", "pope", "pope", "test", _POPE_COLUMNS, _POPE_METRICS),
        LmmsTask(
            "pope_adv", "pope", "pope_full", "adversarial", _POPE_COLUMNS, _POPE_METRICS,
            paper=("table4", "adversarial"),
        ),
        LmmsTask(
            "pope_pop", "pope", "pope_full", "popular", _POPE_COLUMNS, _POPE_METRICS,
            paper=("table4", "popular"),
        ),
        LmmsTask(
            "pope_random", "pope", "pope_full", "random", _POPE_COLUMNS, _POPE_METRICS,
            paper=("table4", "random"),
        ),
        LmmsTask(
            "gqa", "gqa", "gqa", "testdev", ("image", "question", "answer", "imageId"),
            ("exact_match",), paper=("table3", "gqa"), local={"process_docs": None},
        ),
        LmmsTask(
            "vqav2_val", "vqav2", "vqav2", "validation",
            ("image", "question", "question_id", "answers"), ("exact_match",),
            paper=("table3", "vqav2"),
            split_note=(
                "VQAv2: ours is the validation split; the paper's figure is test-dev, scored by "
                "the VQAv2 evaluation server (other questions: compare loosely)."
            ),
        ),
        *(
            LmmsTask(
                name, "mmbench", "mmbench_en", "dev",
                ("image", "question", "hint", "A", "B", "C", "D", "answer", "category", "index"),
                ("gpt_eval_score",), paper=("table3", "mmbench"),
            )
            for name in ("mmbench_en_dev", "mmbench_en_dev_static")
        ),
        LmmsTask(
            "mmvet", "mmvet", "mmvet", "test",
            ("image", "question", "answer", "question_id", "capability"), ("gpt_eval_score",),
            paper=("table3", "mmvet"), unjudged_local={"process_results": mmvet_without_judge},
        ),
    )
}  # fmt: skip

TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("pope", ("pope_adv", "pope_pop", "pope_random")),
        TaskSpec("gqa", ("gqa",)),
        TaskSpec("vqav2", ("vqav2_val",)),
        # Without a GPT judge, MMBench answers are matched to options by rules (lmms-eval's
        # `mmbench_en_dev_static`) instead of waiting on unreachable API calls.
        TaskSpec("mmbench", ("mmbench_en_dev",), unjudged=("mmbench_en_dev_static",)),
        TaskSpec("mmvet", ("mmvet",)),
    )
}

# lmms-eval's POPE metrics -> the key of the paper's Table 4 figure. pope_yes_ratio is the share
# of "yes" in the ground truth and has no paper figure; the paper's "Yes" column is the share of
# "yes" in the answers (yes_ratio_predicted).
POPE_PAPER_KEYS = {
    "pope_accuracy": "accuracy",
    "pope_f1_score": "f1",
    "yes_ratio_predicted": "yes_ratio",
    "pope_yes_ratio": None,
}


def get_task(name: str) -> TaskSpec:
    """The moetool task ``name``; unknown names raise KeyError listing the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def get_lmms_task(name: str) -> LmmsTask:
    """The lmms-eval task ``name`` with local data; unknown names list the known ones."""
    if name not in LMMS_TASKS:
        raise KeyError(f"unknown task {name!r}; tasks with local data: {', '.join(LMMS_TASKS)}")
    return LMMS_TASKS[name]


def task_overrides(task: str, data: str | Path, judge: bool) -> dict:
    """What replaces a built-in lmms-eval task's settings for local data: its data source (the
    ``save_to_disk`` folder under ``data``), the task's ``local`` settings and, without a
    ``judge``, its ``unjudged_local`` ones (MM-Vet keeps predictions with score 0.0)."""
    spec = get_lmms_task(task)
    return {
        "task": task,
        "dataset_path": str(Path(data) / spec.data_folder),
        "dataset_kwargs": {"load_from_disk": True},
        **spec.local,
        **({} if judge else spec.unjudged_local),
    }


def paper_split(lmms_task: str) -> str | None:
    """The split the paper's figure for ``lmms_task`` was measured on (``moetool.paper
    .PAPER_SPLITS``); None where the paper has no figure for it."""
    spec = get_lmms_task(lmms_task)
    return None if spec.paper is None else PAPER_SPLITS[spec.paper]


def splits(lmms_tasks) -> dict[str, dict[str, str | None]]:
    """For the report: each task's split (of its local data) and the paper's split."""
    return {t: {"split": get_lmms_task(t).split, "paper_split": paper_split(t)} for t in lmms_tasks}


def paper_reference(paper, lmms_task: str, metric: str) -> float | None:
    """The paper's figure (``moetool.paper.BenchmarkFigures``) that ``metric`` of ``lmms_task``
    compares with, in percent; None where the paper has none."""
    spec = get_lmms_task(lmms_task)
    if paper is None or spec.paper is None:
        return None
    table, column = spec.paper
    if table == "table4":
        key = POPE_PAPER_KEYS.get(metric)
        return None if key is None else paper.pope[column][key]
    return paper.table3[column]
