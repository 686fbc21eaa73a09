"""``moetool data …``: datasets the project makes itself, and the preflight of a recipe's
data."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_error, print_json, table

app = typer.Typer(
    help="Datasets: check a recipe's data before training; the synthetic shapes world.",
    no_args_is_help=True,
)


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write (must not exist).")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="PNG side in pixels.")] = 64,
    max_objects: Annotated[int, typer.Option("--max-objects", help="Objects per image.")] = 3,
    stage1: Annotated[int, typer.Option("--stage1", help="Caption samples.")] = 2000,
    stage2: Annotated[int, typer.Option("--stage2", help="Stage II instruction samples.")] = 2000,
    stage3: Annotated[int, typer.Option("--stage3", help="Stage III instruction samples.")] = 2000,
    eval_images: Annotated[int, typer.Option("--eval-images", help="Held-out images.")] = 200,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Generate the synthetic shapes world: LLaVA-JSON stage data, evaluation sets, and the same
    sets in lmms-eval's schemas under OUT/lmms (task configs for `lmms-eval --tasks` in
    OUT/lmms/tasks, and OUT/lmms/tasks-judged for MMBench/MM-Vet with a GPT judge)."""
    from moetool.data.synth import SynthConfig
    from moetool.eval.datasets import synthesize_world

    try:
        config = SynthConfig(
            seed=seed,
            image_size=image_size,
            max_objects=max_objects,
            stage1=stage1,
            stage2=stage2,
            stage3=stage3,
            eval_images=eval_images,
        )
        counts = synthesize_world(out, config, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    if as_json:
        print_json(counts)
    else:
        console.print(
            table(
                f"Synthetic shapes world in {out} (seed {seed})",
                ["File", "Records"],
                [[name, str(n)] for name, n in counts.items()],
            )
        )


FIRST_BAD = 5  # bad samples named on the terminal (the JSON lists all)


@app.command("check")
def check(
    recipe: Annotated[str, typer.Argument(help="Recipe file or bundled recipe name.")],
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="Check one stage only: pretrain, instruct or moe_tune."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every problem as JSON.")] = False,
) -> None:
    """Check every sample of the recipe's stage data as training reads it (structure, turn
    order, every image decoded, token lengths against max_length), before any GPU is used.
    Exit 1 when training would stop on the data."""
    from moetool.data.llava_json import DataError
    from moetool.recipe import RecipeError, load_recipe
    from moetool.recipe.paths import resolve_recipe
    from moetool.train.preflight import PreflightError, check_recipe_data

    try:
        loaded = load_recipe(resolve_recipe(recipe), overrides)
        with _phase_bar(disable=as_json) as progress:
            result = check_recipe_data(loaded, [stage] if stage else None, progress=progress)
    except (RecipeError, DataError, PreflightError, OSError) as err:
        fail(str(err))
    if as_json:
        print_json(result.to_json())
    else:
        _render_check(result)
    raise typer.Exit(result.exit_code)


@contextlib.contextmanager
def _phase_bar(disable: bool):
    """A transient bar per phase ("instruct: samples", "instruct: images"); yields the
    ``progress(phase, done, total)`` callback of ``data.check``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable,
    ) as bar:
        tasks: dict[str, object] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield progress


def _render_check(result) -> None:
    rows = []
    for name, s in result.stages.items():
        t = s.tokens or {}
        lengths = "/".join(str(t.get(k, "-")) for k in ("min", "median", "p95", "max"))
        rows.append(
            [
                name,
                f"{s.samples:,}",
                f"{s.with_image:,}",
                f"{s.text_only:,}",
                f"{s.images:,}",
                f"{s.bad:,}",
                lengths,
                str(s.max_length),
                s.verdict(result.skip_bad_samples),
            ]
        )
    columns = ["stage", "samples", "image", "text-only", "images decoded", "bad"]
    columns += ["tokens min/median/p95/max", "max_length", "verdict"]
    console.print(table(f"Data check: {result.recipe}", columns, rows))
    for name, s in result.stages.items():
        counts = {**s.counts("error"), **s.counts("warning")}
        if counts:
            found = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items())
            console.print(f"{name}: {found}")
    stopping = []
    for name, s in result.stages.items():
        verdict = s.verdict(result.skip_bad_samples)
        if verdict == "skip":
            console.print(
                f"[yellow]{name}: {s.bad:,} bad samples would be skipped[/] "
                f"(data.skip_bad_samples), {s.good:,} good ones train"
            )
        elif verdict == "stop":
            stopping.append((name, s))
    if not stopping:
        console.print("[green]the data would go through[/]")
        return
    lines = []
    for name, s in stopping:
        why = "no good sample" if s.good == 0 else f"{s.bad:,} bad samples"
        lines.append(f"stage {name} would stop on its data ({why}); the first:")
        errors = [p for p in s.problems if p.severity == "error"]
        lines += [f"  - {p.message}" for p in errors[:FIRST_BAD]]
        if len(errors) > FIRST_BAD:
            lines.append(f"  … and {len(errors) - FIRST_BAD:,} more (--json lists them all)")
    print_error("\n".join(lines))
