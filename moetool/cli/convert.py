"""``moetool convert``: a published MoE-LLaVA checkpoint -> a moetool sparse checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import byte_progress, console, fail, print_json, stdout_to_stderr


def convert(
    src: Annotated[Path, typer.Argument(help="Official checkpoint directory (e.g. a download).")],
    out: Annotated[Path, typer.Argument(help="New moetool checkpoint directory.")],
    source_format: Annotated[
        str, typer.Option("--from", help="Layout of SRC: moe-llava (the official MoE-LLaVA).")
    ],
    vision_config: Annotated[
        Path | None,
        typer.Option(
            "--vision-config",
            help="The tower's config.json or checkpoint directory (default: the built-in preset "
            "of the config's mm_image_tower).",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="Directory of a transformers tokenizer with the base's vocabulary (default: "
            "SRC; Qwen-1 and StableLM-2 ship remote-code tokenizers, see docs/convert.md).",
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Conversation template (default: the base's)."),
    ] = None,
    keep_capacity: Annotated[
        bool,
        typer.Option(
            "--keep-capacity",
            help="Keep the official capacity factors (tokens over an expert's capacity are "
            "dropped); default: dropless routing.",
        ),
    ] = False,
    drop_lm_head_bias: Annotated[
        bool,
        typer.Option(
            "--drop-lm-head-bias",
            help="Leave out an lm_head.bias tensor (the official model never applies it).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Convert a published MoE-LLaVA checkpoint into one that plain transformers loads."""
    from moetool.convert import ConvertError, ConvertOptions, convert_checkpoint

    options = ConvertOptions(
        vision_config=vision_config,
        tokenizer=tokenizer,
        template=template,
        keep_capacity=keep_capacity,
        drop_lm_head_bias=drop_lm_head_bias,
    )
    with stdout_to_stderr(as_json), byte_progress("converting", disable=as_json) as progress:
        try:
            result = convert_checkpoint(
                src,
                out,
                options,
                source_format=source_format,
                overwrite=overwrite,
                progress=progress,
            )
        except ConvertError as err:
            fail(str(err))
    summary = {"src": str(src), "out": str(out), **result.summary()}
    if as_json:
        print_json(summary)
        return
    moe = summary["moe"]
    capacity = "official capacity" if keep_capacity else "dropless"
    console.print(
        f"[green]converted[/] {src} -> {out}: {summary['model_type']} as "
        f"{summary['text_model_type']}, {moe['num_experts']} experts, top-{moe['top_k']} "
        f"({capacity}), MoE layers {moe['layers']}, template {summary['template']}, "
        f"{summary['bytes'] / 1e9:.3f} GB"
    )
    if summary["dropped"]:
        console.print(f"left out: {', '.join(summary['dropped'])}")
    if summary["vocab_padded"]:
        old, new = summary["vocab_padded"]
        console.print(f"vocabulary grown from {old} to {new} rows for <image> (zero rows)")
