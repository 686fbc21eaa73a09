"""``moetool routing capture | stats | plot``: expert-load and modality analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.options import AttnOpt
from moetool.cli.render import console, fail, print_json, table

app = typer.Typer(
    help="Routing analysis: expert load, modality preference, pathways "
    "(paper section 4.4, Figures 4-6).",
    no_args_is_help=True,
)


@app.command("capture")
def capture(
    model: Annotated[Path, typer.Option("--model", help="Sparse checkpoint directory.")],
    data: Annotated[
        list[Path],
        typer.Option(
            "--data",
            help="LLaVA-JSON file (repeatable), or with --task the evaluation data directory "
            "that `moetool eval --data` reads.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for routing.parquet/.json.")],
    task: Annotated[
        str | None,
        typer.Option("--task", help="lmms-eval task of the --data directory, e.g. pope_random."),
    ] = None,
    image_folder: Annotated[
        Path,
        typer.Option("--image-folder", help="Folder the samples' image paths are relative to."),
    ] = Path("."),
    limit: Annotated[int | None, typer.Option("--limit", help="First N samples.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 4,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Conversation template (default: the checkpoint's)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    attn_implementation: AttnOpt = None,
) -> None:
    """Record every token's experts, weights and modality in every MoE layer."""
    from moetool.data.llava_json import DataError
    from moetool.io import OutputExistsError
    from moetool.routing.capture import capture_to_dir

    try:
        result = capture_to_dir(
            model,
            data,
            out,
            task,
            image_folder,
            limit,
            batch_size,
            template,
            overwrite,
            attn_implementation,
        )
    except (ValueError, DataError, OutputExistsError, OSError) as err:
        fail(str(err))
    console.print(
        f"[green]captured[/] {len(result.records)} routing records "
        f"({result.num_experts} experts, top-{result.top_k}, MoE layers "
        f"{result.layers}) -> {out}"
    )


@app.command("stats")
def stats(
    capture_dir: Annotated[Path, typer.Argument(help="Output of `moetool routing capture`.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the figures (and top pathways) as JSON.")
    ] = False,
) -> None:
    """Expert load per layer, balance (CV, entropy), modality shares and top pathways."""
    from moetool.routing.capture import RoutingCapture
    from moetool.routing.stats import balance, expert_load, summary

    try:
        cap = RoutingCapture.load(capture_dir)
    except (OSError, ValueError) as err:
        fail(f"{capture_dir}: not a routing capture ({err})")
    if as_json:
        print_json(summary(cap))
        return
    load, bal = expert_load(cap), balance(cap)
    rows = [
        [str(layer)]
        + [f"{v:.3f}" for v in load.loc[layer].fillna(0)]
        + [f"{bal.loc[layer, 'cv']:.3f}", f"{bal.loc[layer, 'entropy']:.3f}"]
        for layer in cap.layers
    ]
    console.print(
        table(
            f"Top-1 expert load (balanced = {1 / cap.num_experts:.3f})",
            ["Layer"] + [f"E{e + 1}" for e in range(cap.num_experts)] + ["CV", "Entropy"],
            rows,
        )
    )


@app.command("plot")
def plot(
    capture_dir: Annotated[Path, typer.Argument(help="Output of `moetool routing capture`.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Figure folder (default: CAPTURE/figures).")
    ] = None,
) -> None:
    """Figures 4-6 of the paper as PNG and SVG."""
    from moetool.routing.capture import RoutingCapture
    from moetool.routing.plots import plot_all

    try:
        cap = RoutingCapture.load(capture_dir)
    except (OSError, ValueError) as err:
        fail(f"{capture_dir}: not a routing capture ({err})")
    paths = plot_all(cap, out or capture_dir / "figures")
    console.print("\n".join(str(p) for p in paths))
