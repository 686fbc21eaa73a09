"""The quickstart: the whole MoE-Tuning pipeline on the tiny preset and synthetic data.

Synthetic shapes data -> stage I -> stage II (the dense model) -> upcycling (inside stage III,
as ``moetool moe-tune`` does) -> stage III (the sparse model) -> POPE on both models and on the
sparse model with blank images -> parameter counts -> routing figures. Every step is the library
call behind the matching command, run on the bundled recipe ``tiny/quickstart``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetool.data.synth import SynthConfig

RECIPE = "tiny/quickstart"
# The quickstart world: four object classes, each shape in its own colour (as COCO's classes),
# one to three per image on a background of any palette colour. Stages II and III ask up to four
# questions per image, each whether another class is present, in POPE's phrasing: several
# answers per image encoding, so the attention that matches a question's words to image tokens
# forms in a few hundred steps. Yes and no are balanced: no answer follows from the question.
SYNTH = SynthConfig(
    seed=0,
    image_size=64,
    max_objects=3,
    stage1=2000,
    stage2=8000,
    stage3=4000,
    eval_images=150,
    objects=("red circle", "blue square", "green triangle", "yellow star"),
    question_mix=(("exist", 1),),
    vary_phrasing=False,
    multi_turn=(1.0, 1.0),
    rounds=(4,),
)
BLANK_RGB = (128, 128, 128)  # a grey no scene uses, for the blind control
STAGES = ("pretrain", "instruct", "moe_tune")
NOTE = (
    "The tiny preset trains its vision tower in every stage but stage III (no pretrained tower "
    "exists offline); the paper's recipes keep the tower frozen."
)


@dataclass(frozen=True)
class Event:
    """Progress report: ``kind`` is "phase" (a new step), "step" (a training step) or "done"."""

    kind: str
    phase: str
    step: int = 0
    total: int = 0
    loss: float | None = None


def blank_copy(synth_dir: Path, out: Path) -> None:
    """``out``: the synthetic eval files of ``synth_dir`` with every eval image replaced by one
    uniform grey image of the same size (the blind control)."""
    from PIL import Image

    shutil.copytree(synth_dir / "eval", out / "eval")
    images = sorted((synth_dir / "images" / "eval").glob("*.png"))
    (out / "images" / "eval").mkdir(parents=True)
    for path in images:
        with Image.open(path) as image:
            size = image.size
        Image.new("RGB", size, BLANK_RGB).save(out / "images" / "eval" / path.name)


def pope_summary(metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean accuracy, F1 and predicted-yes share over the three POPE splits, plus each split."""
    from moetool.eval.tasks import TASKS

    splits = {t: metrics[t] for t in TASKS["pope"].lmms}
    mean = {
        key: sum(m[metric] for m in splits.values()) / len(splits)
        for key, metric in (
            ("accuracy", "pope_accuracy"),
            ("f1", "pope_f1_score"),
            ("yes_ratio", "yes_ratio_predicted"),
        )
    }
    return mean | {"splits": splits}


def _routing_samples(synth_dir: Path, out: Path, count: int) -> Path:
    # The POPE questions of the held-out images as LLaVA JSON, answers included.
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads((synth_dir / "eval" / "pope_random.json").read_text())[:count]
    samples = [
        {
            "id": f"pope_random_{r['question_id']}",
            "image": r["image"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + r["question"]},
                {"from": "gpt", "value": r["answer"].capitalize()},
            ],
        }
        for r in records
    ]
    out.write_text(json.dumps(samples, indent=1) + "\n")
    return out


def run_quickstart(
    out: str | Path,
    overwrite: bool = False,
    on_event: Callable[[Event], None] | None = None,
    overrides: list[str] | None = None,
    synth: SynthConfig = SYNTH,
    eval_batch_size: int = 16,
) -> dict[str, Any]:
    """Run the pipeline into ``out`` (refused if it exists, unless ``overwrite``) and return
    the summary also written to ``out/summary.json`` (keys in docs/getting-started.md).

    Everything is written to a temporary sibling that is renamed to ``out`` when complete.
    ``overrides`` are ``--set`` style recipe overrides (tests shorten the schedule with them).
    """
    from moetool.data.synth import generate
    from moetool.eval.datasets import write_eval_datasets
    from moetool.eval.runner import run_eval
    from moetool.io import atomic_output_dir
    from moetool.params import count_recipe
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import resolve_recipe
    from moetool.routing import stats
    from moetool.routing.capture import capture_from_llava_json
    from moetool.routing.plots import plot_all
    from moetool.train.runner import run_stage

    def emit(kind: str, phase: str, **fields: Any) -> None:
        if on_event is not None:
            on_event(Event(kind, phase, **fields))

    recipe = load_recipe(resolve_recipe(RECIPE), overrides or [])
    started = time.perf_counter()
    with atomic_output_dir(out, overwrite) as tmp:
        emit("phase", "data")
        data = tmp / "data"
        generate(data, synth)
        write_eval_datasets(data, data / "lmms")
        blind = tmp / "data-blind"
        blank_copy(data, blind)
        write_eval_datasets(blind, blind / "lmms")

        stages: dict[str, dict[str, Any]] = {}
        run = tmp / "run"
        for stage in STAGES:
            emit("phase", stage, total=getattr(recipe.stages, stage).max_steps)
            began = time.perf_counter()
            result = run_stage(
                recipe,
                stage,
                run,
                recipe_dir=tmp,
                on_step=lambda m, s=stage: emit(
                    "step", s, step=m.step, total=m.total_steps, loss=m.loss
                ),
            )
            stages[stage] = {
                "loss_first": result.loss_first,
                "loss_last": result.loss_last,
                "steps": result.steps,
                "seconds": round(time.perf_counter() - began, 1),
            }
        # The contract's places: the stage II (dense) and stage III (sparse) checkpoints.
        (run / "instruct").rename(tmp / "dense")
        (run / "moe_tune").rename(tmp / "moe")

        pope: dict[str, Any] = {}
        for name, model, lmms in (
            ("dense", "dense", data / "lmms"),
            ("moe", "moe", data / "lmms"),
            ("moe_blind", "moe", blind / "lmms"),
        ):
            emit("phase", f"pope:{name}")
            report = run_eval(
                "pope", tmp / model, lmms, tmp / "eval" / name, batch_size=eval_batch_size
            )
            pope[name] = pope_summary(report.metrics)

        emit("phase", "param-count")
        params = count_recipe(recipe, RECIPE).to_json()
        # The dense model is the same recipe without its [moe] section (problems() is not
        # consulted: counting needs no stage).
        dense_params = count_recipe(dataclasses.replace(recipe, moe=None), RECIPE)

        emit("phase", "routing")
        samples = _routing_samples(data, tmp / "routing" / "samples.json", 64)
        capture = capture_from_llava_json(tmp / "moe", [samples], data, batch_size=16)
        capture.save(tmp / "routing")
        figures = plot_all(capture, tmp / "routing" / "figures")
        load = stats.expert_load(capture)

        summary = {
            "seconds": round(time.perf_counter() - started, 1),
            "recipe": RECIPE,
            "stages": stages,
            "pope": pope,
            "params": {
                "dense_total": dense_params.exact_total,
                "moe_total": params["exact_total"],
                "moe_activated": params["exact_activated"],
                "vision": params["vision_params"],
                "projector": params["projector_params"],
                "formula_total": params["formula_total"],
                "formula_activated": params["formula_activated"],
            },
            "routing": {
                "figures": sorted(str(p.relative_to(tmp)) for p in figures),
                "top1_share_max": float(load.max().max()),
                "top1_share_min": float(load.min().min()),
            },
            "checkpoints": {"dense": "dense", "moe": "moe"},
            "notes": [NOTE],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(run / "pretrain", ignore_errors=True)
    emit("done", "done")
    return summary
