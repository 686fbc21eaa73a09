"""``moetool export``: a sparse checkpoint as a native transformers checkpoint of its VLM with a
native MoE language model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import byte_progress, console, fail, print_json


def export(
    src: Annotated[Path, typer.Argument(help="Sparse moetool checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="New checkpoint directory.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Output format: native (the same transformers VLM whose language model is "
            "qwen3_moe, qwen2_moe or mixtral; Qwen3-VL: qwen3_vl_moe).",
        ),
    ] = "native",
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="auto (the simplest exact one) | qwen3_moe | qwen2_moe | mixtral | qwen3_vl_moe.",
        ),
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Export a sparse checkpoint to a native MoE architecture (loads without moetool).

    Refused, with the reason, where no native architecture is exactly the model."""
    from moetool.export import ExportError, export_checkpoint

    if to != "native":
        fail(f"--to {to!r}: the only export format is native")
    with byte_progress("exporting", disable=as_json) as progress:
        try:
            plan = export_checkpoint(src, out, target, overwrite=overwrite, progress=progress)
        except (ExportError, FileExistsError) as err:
            fail(str(err))
    summary = {
        "src": str(src),
        "out": str(out),
        "target": plan.target,
        "why": plan.why,
        "vlm": plan.config["architectures"][0],
        "architecture": plan.config["text_config"].get(
            "architectures", plan.config["architectures"]
        )[0],
        "tensors": len(plan.tensors),
        "bytes": sum(t.nbytes for t in plan.tensors),
    }
    if as_json:
        print_json(summary)
        return
    console.print(
        f"[green]exported[/] {src} -> {out}: {plan.config['architectures'][0]} with a "
        f"{plan.target} language model "
        f"({plan.why}); loads with transformers alone"
    )
