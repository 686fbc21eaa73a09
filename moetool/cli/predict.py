"""``moetool predict``: ask a checkpoint one question about one image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.options import AttnOpt
from moetool.cli.render import console, fail, print_json


def predict(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory (dense or sparse).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The question or instruction.")],
    image: Annotated[
        Path | None, typer.Option("--image", help="Image file (leave out for text only).")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")
    ] = 32,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, …")] = "cpu",
    attn_implementation: AttnOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Answer one prompt about one image with the checkpoint's chat template (greedy)."""
    from moetool.predict import PredictError
    from moetool.predict import predict as run_predict

    try:
        result = run_predict(model, prompt, image, max_new_tokens, device, attn_implementation)
    except PredictError as err:
        fail(str(err))
    if as_json:
        print_json(result.to_json())
    else:
        console.print(result.answer, highlight=False, markup=False)
