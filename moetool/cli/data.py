"""``moetool data …``: datasets the project makes itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_json, table

app = typer.Typer(
    help="Datasets: the synthetic shapes world for tests, CI and the quickstart.",
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
