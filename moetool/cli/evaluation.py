"""``moetool eval``: VQAv2, GQA, POPE, MMBench and MM-Vet through lmms-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.options import AttnOpt
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
    device: Annotated[
        str, typer.Option("--device", help="cpu, cuda, cuda:0 … (under torchrun: cuda)")
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32 | bf16: the dtype the model runs in.")
    ] = "fp32",
    attn_implementation: AttnOpt = None,
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
                dtype=dtype,
                attn_implementation=attn_implementation,
            )
    except EvalError as err:
        fail(str(err))
    if report is None:
        return  # a rank other than 0 of a data-parallel evaluation: rank 0 reports
    if as_json:
        print_json(
            {
                "task": task,
                "metrics": report.metrics,
                "samples": report.samples,
                "out": str(out),
                "notes": report.notes,
                "dtype": report.dtype,
                "world_size": report.world_size,
                "splits": report.splits,
            }
        )
        return
    paper = report.paper
    rows = []
    for lmms_task, metrics in report.metrics.items():
        split = report.splits[lmms_task]
        for metric, value in metrics.items():
            reference = paper_reference(paper, lmms_task, metric)
            scale = 1.0 if metric == "gpt_eval_score" else 100.0
            shown = "-" if reference is None else f"{reference:.1f}"
            rows.append(
                [
                    lmms_task,
                    split["split"],
                    metric,
                    f"{value * scale:.1f}",
                    shown,
                    split["paper_split"] if reference is not None else "-",
                ]
            )
    ranks = f", {report.world_size} ranks" if report.world_size > 1 else ""
    console.print(
        table(
            f"{task} on {model} ({report.samples} samples, {report.dtype}{ranks})",
            [
                "Task",
                "Split",
                "Metric",
                "Ours (%)",
                f"Paper ({paper.name})" if paper else "Paper",
                "Paper split",
            ],
            rows,
            caption="\n".join(report.notes),
        )
    )
    console.print(
        f"results: {out / 'results.json'}, {out / 'results.csv'}, per-sample log "
        f"{out / 'samples.jsonl'}"
    )
