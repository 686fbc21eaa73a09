"""Local evaluation data in the schemas of the hub datasets lmms-eval's tasks read, saved with
``datasets.save_to_disk`` (one ``DatasetDict`` per directory, split names as the tasks expect)."""

from __future__ import annotations

import json
from pathlib import Path

from moetool.eval.tasks import LMMS_TASKS, TASKS, task_overrides


def write_eval_datasets(synth_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Convert the synthetic world's ``eval/*.json`` into lmms-eval's schemas under ``out``
    (``pope``, ``pope_full``, ``gqa``, ``vqav2``, ``mmbench_en``, ``mmvet``)."""
    from datasets import Dataset, DatasetDict, Features, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    disable_progress_bars()

    synth_dir, out = Path(synth_dir), Path(out)

    def load(name: str) -> list[dict]:
        return json.loads((synth_dir / "eval" / f"{name}.json").read_text())

    def image(path: str) -> str:
        return str(synth_dir / path)

    text = Value("string")
    pope_features = Features(
        {
            "id": text,
            "question_id": text,
            "question": text,
            "answer": text,
            "image_source": text,
            "image": ImageFeature(),
            "category": text,
        }
    )

    def pope_rows(records):
        return {
            "id": [str(r["question_id"]) for r in records],
            "question_id": [str(r["question_id"]) for r in records],
            "question": [r["question"] for r in records],
            "answer": [r["answer"] for r in records],
            "image_source": [Path(r["image"]).stem for r in records],
            "image": [image(r["image"]) for r in records],
            "category": [r["category"] for r in records],
        }

    splits = {c: load(f"pope_{c}") for c in ("adversarial", "popular", "random")}
    counts = {}
    DatasetDict(
        {
            c: Dataset.from_dict(pope_rows(rows), features=pope_features)
            for c, rows in splits.items()
        }
    ).save_to_disk(out / "pope_full")
    # The plain `pope` task reads one test split: the three samplings together, as the hub's.
    every = [r for rows in splits.values() for r in rows]
    DatasetDict({"test": Dataset.from_dict(pope_rows(every), features=pope_features)}).save_to_disk(
        out / "pope"
    )
    counts["pope"] = len(every)

    gqa = load("gqa")
    DatasetDict(
        {
            "testdev": Dataset.from_dict(
                {
                    "id": [str(r["question_id"]) for r in gqa],
                    "imageId": [Path(r["image"]).stem for r in gqa],
                    "question": [r["question"] for r in gqa],
                    "answer": [r["answer"] for r in gqa],
                    "fullAnswer": [r["answer"] for r in gqa],
                    "image": [image(r["image"]) for r in gqa],
                },
                features=Features(
                    {
                        "id": text,
                        "imageId": text,
                        "question": text,
                        "answer": text,
                        "fullAnswer": text,
                        "image": ImageFeature(),
                    }
                ),
            )
        }
    ).save_to_disk(out / "gqa")
    counts["gqa"] = len(gqa)

    vqa = load("vqav2")
    answer_features = {"answer": text, "answer_confidence": text, "answer_id": Value("int64")}
    DatasetDict(
        {
            "validation": Dataset.from_dict(
                {
                    "question_id": [int(r["question_id"]) for r in vqa],
                    "question": [r["question"] for r in vqa],
                    "image_id": [i for i, _ in enumerate(vqa)],
                    "question_type": [r["question_type"] for r in vqa],
                    "answer_type": [r["answer_type"] for r in vqa],
                    "multiple_choice_answer": [r["answers"][0] for r in vqa],
                    "answers": [
                        [
                            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(r["answers"])
                        ]
                        for r in vqa
                    ],
                    "image": [image(r["image"]) for r in vqa],
                },
                features=Features(
                    {
                        "question_id": Value("int64"),
                        "question": text,
                        "image_id": Value("int64"),
                        "question_type": text,
                        "answer_type": text,
                        "multiple_choice_answer": text,
                        "answers": [answer_features],
                        "image": ImageFeature(),
                    }
                ),
            )
        }
    ).save_to_disk(out / "vqav2")
    counts["vqav2"] = len(vqa)

    mmb = load("mmbench")
    columns = ("question", "A", "B", "C", "D", "answer", "category")
    data = {c: [r[c] for r in mmb] for c in columns}
    data.update(
        index=[int(r["index"]) for r in mmb],
        hint=["nan"] * len(mmb),
        image=[image(r["image"]) for r in mmb],
        source=["moetool-synth"] * len(mmb),
        **{"L2-category": [r["category"] for r in mmb]},
        comment=["nan"] * len(mmb),
        split=["dev"] * len(mmb),
    )
    features = {c: text for c in data}
    features.update(index=Value("int64"), image=ImageFeature())
    DatasetDict({"dev": Dataset.from_dict(data, features=Features(features))}).save_to_disk(
        out / "mmbench_en"
    )
    counts["mmbench_en"] = len(mmb)

    # MM-Vet style: open questions with short reference answers (from the GQA-style set).
    DatasetDict(
        {
            "test": Dataset.from_dict(
                {
                    "question_id": [f"v{r['question_id']}" for r in gqa],
                    "image": [image(r["image"]) for r in gqa],
                    "question": [r["question"] for r in gqa],
                    "answer": [r["answer"] for r in gqa],
                    "image_source": [Path(r["image"]).stem for r in gqa],
                    "capability": ["rec"] * len(gqa),
                },
                features=Features(
                    {
                        "question_id": text,
                        "image": ImageFeature(),
                        "question": text,
                        "answer": text,
                        "image_source": text,
                        "capability": text,
                    }
                ),
            )
        }
    ).save_to_disk(out / "mmvet")
    counts["mmvet"] = len(gqa)
    return counts


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if callable(value):
        return f"!function {value.__module__}.{value.__name__}"
    return str(value)


def synthesize_world(out: str | Path, config=None, overwrite: bool = False) -> dict[str, int]:
    """``moetool data synth``: the synthetic world (``moetool.data.synth.generate``) and, in the
    same temporary folder before it becomes ``out``, its evaluation sets in lmms-eval's schemas
    (``out/lmms``) and task configs for the ``lmms-eval`` command line (``out/lmms/tasks``, and
    ``out/lmms/tasks-judged`` for MMBench/MM-Vet with a GPT judge). Nothing of ``out`` exists
    until all of it does. Returns the record counts per file."""
    from moetool.data.synth import generate

    def lmms_files(tmp: Path, final: Path) -> dict[str, int]:
        counts = write_eval_datasets(tmp, tmp / "lmms")
        # The task configs name the data where it will be, not in the temporary folder.
        write_task_yamls(final / "lmms", tmp / "lmms" / "tasks")
        write_task_yamls(final / "lmms", tmp / "lmms" / "tasks-judged", judge=True)
        return {f"lmms/{name}": n for name, n in counts.items()}

    return generate(out, config, overwrite=overwrite, also=lmms_files)


def write_task_yamls(data: str | Path, out: str | Path, judge: bool = False) -> list[Path]:
    """Task configs for the ``lmms-eval`` command line (``--tasks DIR``): each names a built-in
    task and replaces only what ``task_overrides`` replaces. Without ``judge``, MMBench is the
    rule-scored ``mmbench_en_dev_static`` and MM-Vet keeps predictions unscored (run it with
    ``API_TYPE=dummy`` so that lmms-eval imports the task without credentials)."""
    data, out = Path(data).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The lmms-eval tasks that `moetool eval` runs with (or without) a judge, in table order.
    run = {name for spec in TASKS.values() for name in spec.lmms_tasks(judge)}
    written = []
    for task in (name for name in LMMS_TASKS if name in run):
        lines = []
        for key, value in task_overrides(task, data, judge).items():
            if isinstance(value, dict):
                lines.append(f"{key}:")
                lines += [f"  {k}: {_yaml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key}: {_yaml_value(value)}")
        path = out / f"{task}.yaml"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written
