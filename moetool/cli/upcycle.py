"""``moetool upcycle``: dense LLaVA checkpoint -> sparse MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import byte_progress, console, fail, print_json

# MoEConfig keys -> the flags that set them, for error lines.
FLAGS = {
    "num_experts": "--experts",
    "top_k": "--topk",
    "layers": "--layers",
    "normalize_top_k": "--renormalize",
    "capacity_factor": "--capacity-factor",
    "eval_capacity_factor": "--eval-capacity-factor",
    "aux_loss_coef": "--aux-loss-coef",
    "router_init": "--router-init",
    "router_std": "--router-std",
    "drop_upcycling": "--drop-upcycling",
}


def upcycle(
    src: Annotated[Path, typer.Argument(help="Dense LLaVA checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="New sparse checkpoint directory.")],
    experts: Annotated[int, typer.Option("--experts", help="Experts per MoE layer (>= 2).")] = 4,
    topk: Annotated[int, typer.Option("--topk", help="Experts per token.")] = 2,
    layers: Annotated[
        str,
        typer.Option("--layers", help="interval | first-half | second-half | all | 0,2,4…"),
    ] = "interval",
    router_init: Annotated[
        str, typer.Option("--router-init", help="normal | zeros | kaiming")
    ] = "normal",
    router_std: Annotated[float, typer.Option("--router-std", help="Std of normal init.")] = 0.02,
    seed: Annotated[int, typer.Option("--seed", help="Seed of router / Drop-Upcycling init.")] = 0,
    drop_upcycling: Annotated[
        float,
        typer.Option(
            "--drop-upcycling",
            help="Re-initialise this ratio of each expert's "
            "intermediate neurons (Drop-Upcycling); 0 = exact copies.",
        ),
    ] = 0.0,
    capacity_factor: Annotated[
        float, typer.Option("--capacity-factor", help="Training capacity; 0 = dropless.")
    ] = 0.0,
    eval_capacity_factor: Annotated[
        float, typer.Option("--eval-capacity-factor", help="Evaluation capacity; 0 = dropless.")
    ] = 0.0,
    aux_loss_coef: Annotated[float, typer.Option("--aux-loss-coef", help="Alpha of Eq. 7.")] = 0.01,
    raw_weights: Annotated[
        bool | None,
        typer.Option(
            "--raw-weights/--renormalize",
            help="Combine with the raw softmax probabilities (Eq. 6) or with the top-k "
            "probabilities renormalised to sum to 1. Default: renormalised for top-k >= 2 (exact "
            "upcycling), raw for top-1 (renormalising one weight gives 1 and the router no "
            "gradient from the LM loss).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Copy each chosen FFN into E experts and add a router (exact: logits unchanged)."""
    from moetool.models.moe.config import MoEConfig, parse_layer_layout
    from moetool.upcycle import UpcycleError, upcycle_checkpoint

    try:
        layout = parse_layer_layout(layers)
    except ValueError as err:
        fail(f"--layers: {err}")
    moe = MoEConfig(
        num_experts=experts,
        top_k=topk,
        layers=layout,
        normalize_top_k=None if raw_weights is None else not raw_weights,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        aux_loss_coef=aux_loss_coef,
        router_init=router_init,
        router_std=router_std,
        drop_upcycling=drop_upcycling,
    )
    problems = moe.problems()
    if problems:
        fail("; ".join(f"{FLAGS.get(key, key)}: {message}" for key, message in problems))
    with byte_progress("upcycling", disable=as_json) as progress:
        try:
            plan = upcycle_checkpoint(
                src,
                out,
                moe,
                seed=seed,
                overwrite=overwrite,
                progress=progress,
            )
        except UpcycleError as err:
            fail(str(err))
    summary = {
        "src": str(src),
        "out": str(out),
        "moe": plan.moe.to_dict(),
        "mlp_structure": plan.structure.name,
        "tensors": len(plan.tensors),
        "bytes": sum(t.nbytes for t in plan.tensors),
    }
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"[green]upcycled[/] {src} -> {out}: {experts} experts, top-{topk} "
            f"({'renormalised' if plan.moe.renormalize else 'raw softmax'} weights), MoE layers "
            f"{list(plan.moe_layers)} ({plan.structure.name}), "
            f"{summary['bytes'] / 1e9:.3f} GB"
        )
