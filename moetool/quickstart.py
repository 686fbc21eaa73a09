"""The quickstart: the whole MoE-Tuning pipeline on a tiny model and synthetic data.

Synthetic shapes data -> stage I -> stage II (the dense model) -> upcycling (inside stage III,
as ``moetool moe-tune`` does) -> stage III (the sparse model) -> POPE on both models and on the
sparse model with blank images -> parameter counts -> routing figures. Every step is the library
call behind the matching command, run on a bundled recipe: ``tiny/quickstart`` (the LLaVA layout
built from parts), or, on a whole dense VLM (``--base qwen3-vl``), ``tiny/quickstart-qwen3-vl``
on a tiny random Qwen3-VL that the quickstart builds first (no stage I there).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.data.synth import SynthConfig

if TYPE_CHECKING:
    from moetool.recipe.schema import Recipe

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
# The tiny Qwen3-VL of `--base qwen3-vl`: the LLaVA quickstart's language model (hidden 128,
# 4 layers, 4 heads, vocabulary 1,024 plus the family's special tokens, the wider 0.08
# initialisation); 64-pixel images in 16-pixel patches merged 2x2: 4 image tokens, one per
# quadrant, as the LLaVA quickstart's tower gives.
QWEN3_VL_SIZES: dict[str, Any] = {
    "num_layers": 4,
    "vocab_size": 1024,
    "text": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "initializer_range": 0.08,
    },
    "vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "initializer_range": 0.08,
    },
}
QWEN3_VL_NOTE = (
    "The tiny Qwen3-VL starts random (no pretrained model exists offline), so stage II trains "
    "its vision encoder, connector and language model together from scratch and there is no "
    "stage I; the paper starts from a pretrained LLM and keeps the vision tower frozen."
)
# The [model] dims a whole-VLM recipe still spells out on this loader, from the text config:
# moetool's family of the base's decoder (the same parameters; only its name differs).


@dataclass(frozen=True)
class QuickstartBase:
    """One ``--base`` of the quickstart: its recipe, the stages it runs and, for a whole dense
    VLM, the ``model_type`` and sizes of the tiny random model it starts from."""

    name: str
    recipe: str
    stages: tuple[str, ...]
    note: str
    model_type: str | None = None  # None: the LLaVA layout, built from parts by stage I
    sizes: dict[str, Any] = field(default_factory=dict)  # build_random_vlm's size arguments


BASES: dict[str, QuickstartBase] = {
    base.name: base
    for base in (
        QuickstartBase("llava", RECIPE, STAGES, NOTE),
        QuickstartBase(
            "qwen3-vl",
            "tiny/quickstart-qwen3-vl",
            ("instruct", "moe_tune"),
            QWEN3_VL_NOTE,
            model_type="qwen3_vl",
            sizes=QWEN3_VL_SIZES,
        ),
    )
}


def get_quickstart_base(name: str) -> QuickstartBase:
    """The quickstart of ``--base name``; a ``ValueError`` listing the known ones otherwise."""
    if name not in BASES:
        raise ValueError(f"--base {name!r}: unknown base; known: {', '.join(BASES)}")
    return BASES[name]


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


def tiny_base(base: QuickstartBase):
    """(model, processor): the tiny random dense VLM a whole-VLM quickstart starts from."""
    from moetool.tiny_vlm import build_random_vlm

    return build_random_vlm(base.model_type, seed=0, **base.sizes)


def load_quickstart_recipe(
    base: QuickstartBase,
    overrides: list[str] | tuple[str, ...] = (),
    checkpoint: Path | None = None,
) -> Recipe:
    """The bundled recipe of ``base`` with ``--set`` style ``overrides``; a whole-VLM recipe
    starts from the tiny base in ``checkpoint`` when given (``model.path`` and ``model.config``
    there; the bundled config file is that base's config, tested)."""
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import resolve_recipe

    given: list[str] = []
    if base.model_type is not None and checkpoint is not None:
        given = [
            f"model.path={json.dumps(str(checkpoint))}",
            f"model.config={json.dumps(str(checkpoint / 'config.json'))}",
        ]
    return load_recipe(resolve_recipe(base.recipe), [*given, *overrides])


def _param_counts(base: QuickstartBase, recipe: Recipe, out: Path) -> dict[str, Any]:
    """The summary's ``params``: exact counts of the dense and the sparse language model, the
    vision tower and the projector (connector), and Eq. 12 for the sparse model."""
    from moetool.params import count_config, count_recipe

    if base.model_type is None:
        sparse = count_recipe(recipe, base.recipe)
        # The dense model is the same recipe without its [moe] section (problems() is not
        # consulted: counting needs no stage).
        dense = count_recipe(dataclasses.replace(recipe, moe=None), base.recipe)
    else:  # the checkpoints' own configs (the sparse one with its own plan)
        sparse, dense = count_config(out / "moe"), count_config(out / "dense")
    return {
        "dense_total": dense.exact_total,
        "moe_total": sparse.exact_total,
        "moe_activated": sparse.exact_activated,
        "vision": sparse.vision_params,
        "projector": sparse.projector_params,
        "formula_total": sparse.formula_total,
        "formula_activated": sparse.formula_activated,
    }


def run_quickstart(
    out: str | Path,
    overwrite: bool = False,
    on_event: Callable[[Event], None] | None = None,
    overrides: list[str] | None = None,
    synth: SynthConfig = SYNTH,
    eval_batch_size: int = 16,
    base: str = "llava",
) -> dict[str, Any]:
    """Run the pipeline of ``base`` (``BASES``) into ``out`` (refused if it exists, unless
    ``overwrite``) and return the summary also written to ``out/summary.json`` (keys in
    docs/getting-started.md).

    Everything is written to a temporary sibling that is renamed to ``out`` when complete.
    ``overrides`` are ``--set`` style recipe overrides (tests shorten the schedule with them).
    """
    from moetool.data.synth import generate
    from moetool.eval.datasets import write_eval_datasets
    from moetool.eval.runner import run_eval
    from moetool.io import atomic_output_dir
    from moetool.routing import stats
    from moetool.routing.capture import capture_from_llava_json
    from moetool.routing.plots import plot_all
    from moetool.train.runner import run_stage

    def emit(kind: str, phase: str, **fields: Any) -> None:
        if on_event is not None:
            on_event(Event(kind, phase, **fields))

    spec = get_quickstart_base(base)
    started = time.perf_counter()
    with atomic_output_dir(out, overwrite) as tmp:
        emit("phase", "data")
        data = tmp / "data"
        generate(data, synth)
        write_eval_datasets(data, data / "lmms")
        blind = tmp / "data-blind"
        blank_copy(data, blind)
        write_eval_datasets(blind, blind / "lmms")

        checkpoint = None
        if spec.model_type is not None:  # the whole dense VLM the recipe starts from
            from moetool.models.build import save_checkpoint

            emit("phase", "base")
            checkpoint = tmp / "base"
            save_checkpoint(*tiny_base(spec), checkpoint)
        recipe = load_quickstart_recipe(spec, overrides or [], checkpoint=checkpoint)

        stages: dict[str, dict[str, Any]] = {}
        run = tmp / "run"
        for stage in spec.stages:
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
        params = _param_counts(spec, recipe, tmp)

        emit("phase", "routing")
        samples = _routing_samples(data, tmp / "routing" / "samples.json", 64)
        capture = capture_from_llava_json(tmp / "moe", [samples], data, batch_size=16)
        capture.save(tmp / "routing")
        figures = plot_all(capture, tmp / "routing" / "figures")
        load = stats.expert_load(capture)

        summary = {
            "seconds": round(time.perf_counter() - started, 1),
            "base": spec.name,
            "recipe": spec.recipe,
            "stages": stages,
            "pope": pope,
            "params": params,
            "routing": {
                "figures": sorted(str(p.relative_to(tmp)) for p in figures),
                "top1_share_max": float(load.max().max()),
                "top1_share_min": float(load.min().min()),
            },
            "checkpoints": {"dense": "dense", "moe": "moe"},
            "notes": [spec.note],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(run / "pretrain", ignore_errors=True)
    emit("done", "done")
    return summary
