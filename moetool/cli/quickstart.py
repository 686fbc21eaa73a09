"""``moetool quickstart``: the whole pipeline on a tiny model, in minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_json, stdout_to_stderr, table

PHASES = {
    "data": "synthetic data",
    "base": "random dense VLM (the base)",
    "pretrain": "stage I (projector + vision)",
    "instruct": "stage II (LLM + projector + vision)",
    "moe_tune": "upcycle + stage III (MoE layers)",
    "pope:dense": "POPE, dense",
    "pope:moe": "POPE, MoE",
    "pope:moe_blind": "POPE, MoE with blank images",
    "param-count": "parameter counts",
    "routing": "routing figures",
}


def quickstart(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("quickstart"),
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="llava: the LLaVA layout built from parts (3 stages); qwen3-vl: a whole tiny "
            "Qwen3-VL (stages II and III).",
        ),
    ] = "llava",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing DIR.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json at the end.")] = False,
) -> None:
    """Run the whole pipeline on a tiny model: data, stages, upcycle, POPE, counts, figures.

    Synthetic data -> stage I -> stage II -> upcycle -> stage III ->
    POPE on the dense, the sparse and the blind sparse model ->
    param-count -> routing figures.
    --base qwen3-vl starts from a tiny random Qwen3-VL (built into DIR/base) at stage II.
    Writes DIR/summary.json and the checkpoints DIR/dense and DIR/moe.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from moetool.io import OutputExistsError
    from moetool.quickstart import get_quickstart_base, run_quickstart
    from moetool.train.runner import TrainingError

    try:
        get_quickstart_base(base)
    except ValueError as err:
        fail(str(err))
    if out.exists() and not overwrite:
        fail(f"{out} already exists (pass --overwrite to replace it)")
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        "{task.fields[info]}",
        console=console,
        disable=as_json,
    ) as progress:
        tasks: dict[str, int] = {}

        def on_event(event) -> None:
            if event.kind == "phase":
                for task in tasks.values():  # the previous phase is complete
                    progress.update(task, completed=progress.tasks[task].total)
                tasks[event.phase] = progress.add_task(
                    PHASES.get(event.phase, event.phase), total=event.total or 1, info=""
                )
            elif event.kind == "step":
                progress.update(
                    tasks[event.phase],
                    completed=event.step,
                    total=event.total,
                    info=f"loss {event.loss:.3f}",
                )
            elif event.kind == "done":
                for task in tasks.values():
                    progress.update(task, completed=progress.tasks[task].total)

        try:
            with stdout_to_stderr(as_json):
                summary = run_quickstart(out, overwrite=overwrite, on_event=on_event, base=base)
        except (OutputExistsError, TrainingError, ValueError, OSError) as err:
            fail(str(err))
    if as_json:
        print_json(summary)
        return
    _render(summary, out)


def _render(summary: dict, out: Path) -> None:
    rows = []
    for name, label in (("dense", "dense"), ("moe", "MoE ×4 top-2"), ("moe_blind", "MoE, blind")):
        p = summary["pope"][name]
        splits = p["splits"]
        rows.append(
            [
                label,
                f"{p['accuracy']:.3f}",
                f"{p['f1']:.3f}",
                f"{p['yes_ratio']:.2f}",
                *(
                    f"{splits[t]['pope_accuracy']:.3f}"
                    for t in ("pope_adv", "pope_pop", "pope_random")
                ),
            ]
        )
    console.print(
        table(
            "POPE (synthetic, three splits)",
            ["model", "accuracy", "F1", "yes", "adv", "pop", "rand"],
            rows,
        )
    )
    stage_rows = [
        [
            name,
            str(s["steps"]),
            f"{s['loss_first']:.3f}",
            f"{s['loss_last']:.3f}",
            f"{s['seconds']:.0f}",
        ]
        for name, s in summary["stages"].items()
    ]
    console.print(
        table("Training", ["stage", "steps", "first loss", "last loss", "seconds"], stage_rows)
    )
    params = summary["params"]
    console.print(
        f"parameters: dense {params['dense_total']:,}; MoE {params['moe_total']:,} total, "
        f"{params['moe_activated']:,} activated"
    )
    console.print(f"[dim]{summary['notes'][0]}[/]")
    console.print(
        f"[green]done[/] in {summary['seconds']:.0f} s: {out}/summary.json, checkpoints "
        f"{out}/dense and {out}/moe, routing figures in {out}/routing/figures"
    )
