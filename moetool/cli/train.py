"""``moetool pretrain | instruct | moe-tune``: the three stages of MoE-Tuning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_json, stdout_to_stderr

RecipeArg = Annotated[str, typer.Argument(help="Recipe file or bundled recipe name.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key (repeatable).")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Run directory; each stage writes DIR/<stage> and "
        "DIR/<stage>-state. Default: runs/<recipe name>.",
    ),
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init",
        help="Checkpoint to start from (default: the previous stage's "
        "output in the run directory).",
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Train the stage again.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary at the end.")]


def _run(stage: str, recipe: str, overrides, out, init, resume, overwrite, as_json) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from moetool.data.llava_json import DataError
    from moetool.data.templates import TemplateError
    from moetool.recipe import RecipeError, load_recipe
    from moetool.recipe.paths import resolve_recipe
    from moetool.train.runner import TrainingError, run_stage

    try:
        path = resolve_recipe(recipe)
        loaded = load_recipe(path, overrides)
    except RecipeError as err:
        fail(str(err))
    run_dir = out or Path("runs") / path.stem
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        "{task.fields[info]}",
        console=console,
        disable=as_json,
    ) as bar:
        task = bar.add_task(stage, total=None, info="")

        def on_step(m) -> None:
            info = f"loss {m.loss:.4f}"
            if m.aux_loss is not None:
                info += f" aux/layer {m.aux_loss:.3f}"
            info += f" lr {m.lr:.2e} {m.tokens_per_s:,.0f} tok/s"
            bar.update(task, completed=m.step, total=m.total_steps, info=info)

        try:
            with stdout_to_stderr(as_json):
                result = run_stage(
                    loaded,
                    stage,
                    run_dir,
                    init=init,
                    resume=resume,
                    overwrite=overwrite,
                    on_step=on_step,
                    on_note=lambda line: console.print(line, style="yellow", markup=False),
                )
        except (TrainingError, DataError, TemplateError, FileNotFoundError) as err:
            fail(str(err))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under a launcher, rank 0 reports
    summary = {
        "stage": stage,
        "checkpoint": str(result.checkpoint),
        "steps": result.steps,
        "loss_first": result.loss_first,
        "loss_last": result.loss_last,
        "metrics": str(result.metrics),
        "skipped": result.skipped,  # bad samples skipped (data.skip_bad_samples), by reason
    }
    if as_json:
        print_json(summary)
        return
    if result.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items()))
        console.print(f"[yellow]skipped {sum(result.skipped.values())} bad samples[/]: {reasons}")
    console.print(
        f"[green]{stage} done[/]: {result.steps} steps, loss {result.loss_first:.4f}"
        f" -> {result.loss_last:.4f}; checkpoint {result.checkpoint} "
        "(aux/layer = load-balancing loss per MoE layer, 1.0 = balanced)"
    )


def _stage_command(stage: str, doc: str):
    def command(
        recipe: RecipeArg,
        overrides: SetOpt = None,
        out: OutOpt = None,
        init: InitOpt = None,
        resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        _run(stage, recipe, overrides, out, init, resume, overwrite, as_json)

    command.__doc__ = doc
    command.__name__ = stage
    return command


pretrain = _stage_command(
    "pretrain", "Stage I: train the projector (image-caption data, plain template)."
)
instruct = _stage_command(
    "instruct", "Stage II: train the LLM and the projector on instruction data."
)
moe_tune = _stage_command(
    "moe_tune",
    "Stage III: train the MoE layers (a dense --init is upcycled per the recipe's moe section).",
)
