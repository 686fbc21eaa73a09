"""``moetool eval``: VQAv2, GQA, POPE, MMBench and MM-Vet through lmms-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_json, stdout_to_stderr, table


def eval_command(
    task: Annotated[str, typer.Argument(help="pope | gqa | vqav2 | mmbench | mmvet")],
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory.")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for results.json, results.csv and samples.jsonl."),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Local datasets (save_to_disk directories named pope, pope_full, gqa, "
            "vqav2, mmbench_en, mmvet); default: DATA/lmms of `moetool data synth DATA` in ./data",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="First N samples per task.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generation batch.")] = 1,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:0 …")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results in OUT.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Evaluate a checkpoint with lmms-eval's own task definitions, offline on local data."""
    from moetool.eval.runner import EvalError, run_eval
    from moetool.eval.tasks import paper_reference

    data = data or Path("data/lmms")
    try:
        with stdout_to_stderr():
            report = run_eval(
                task,
                model,
                data,
                out,
                limit=limit,
                batch_size=batch_size,
                device=device,
                overwrite=overwrite,
            )
    except EvalError as err:
        fail(str(err))
    if as_json:
        print_json(
            {
                "task": task,
                "metrics": report.metrics,
                "samples": report.samples,
                "out": str(out),
                "notes": report.notes,
            }
        )
        return
    paper = report.paper
    rows = []
    for lmms_task, metrics in report.metrics.items():
        for metric, value in metrics.items():
            reference = paper_reference(paper, lmms_task, metric)
            scale = 1.0 if metric == "gpt_eval_score" else 100.0
            shown = "-" if reference is None else f"{reference:.1f}"
            rows.append([lmms_task, metric, f"{value * scale:.1f}", shown])
    console.print(
        table(
            f"{task} on {model} ({report.samples} samples)",
            ["Task", "Metric", "Ours (%)", f"Paper ({paper.name})" if paper else "Paper"],
            rows,
            caption="\n".join(report.notes),
        )
    )
    console.print(
        f"results: {out / 'results.json'}, {out / 'results.csv'}, per-sample log "
        f"{out / 'samples.jsonl'}"
    )
