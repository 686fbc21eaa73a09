"""``moetool param-count``: Eq. 12 of the paper and exact counts of the real architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetool.cli.render import billions, console, fail, millions, print_json, table


def param_count(
    recipe: Annotated[
        str | None,
        typer.Argument(help="Recipe file, or a bundled recipe name such as qwen-1.8b/moe-4x-top2."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key, e.g. --set moe.num_experts=8."),
    ] = None,
    paper_table: Annotated[
        bool, typer.Option("--table", help="All 12 rows of the paper's Table 8.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Count a local transformers config.json instead."),
    ] = None,
    experts: Annotated[
        int | None, typer.Option("--experts", help="With --config: experts per MoE layer.")
    ] = None,
    topk: Annotated[int, typer.Option("--topk", help="With --config: experts per token.")] = 2,
    layers: Annotated[
        str,
        typer.Option(
            "--layers", help="With --config: interval | first-half | second-half | all | 0,2,4"
        ),
    ] = "interval",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recount instead of reusing a cached exact count.")
    ] = False,
) -> None:
    """Count parameters: the paper's Eq. 12 and exact counts (total and activated)."""
    from moetool import params
    from moetool.recipe import RecipeError, load_recipe
    from moetool.recipe.paths import resolve_recipe

    chosen = [x for x in (recipe is not None, paper_table, config is not None) if x]
    if len(chosen) != 1:
        fail("give exactly one of RECIPE, --table or --config")
    if config is None and (experts is not None):
        fail(
            "--experts/--topk/--layers go with --config; a recipe sets them in [moe] "
            "(override with --set moe.num_experts=…)"
        )
    if overrides and recipe is None:
        fail("--set goes with a RECIPE")
    try:
        if paper_table:
            reports = params.count_table(use_cache=not no_cache)
        elif config is not None:
            reports = [params.count_config(config, experts, topk, layers)]
        else:
            path = resolve_recipe(recipe)
            reports = [
                params.count_recipe(
                    load_recipe(path, overrides), str(recipe), use_cache=not no_cache
                )
            ]
    except RecipeError as err:
        fail(str(err))
    except ValueError as err:
        fail(str(err))

    if as_json:
        print_json([r.to_json() for r in reports] if paper_table else reports[0].to_json())
    elif paper_table:
        _render_table8(reports)
    else:
        _render_one(reports[0])


def _render_table8(reports) -> None:
    rows = []
    for r in reports:
        mark = "" if r.paper_consistent else " ‡"
        rows.append(
            [
                r.name + mark,
                f"{r.paper_total_b:.1f}",
                f"{r.formula_total / 1e9:.3f}",
                f"{r.exact_total / 1e9:.3f}",
                f"{r.paper_activated_b:.1f}",
                f"{r.formula_activated / 1e9:.3f}",
                f"{r.exact_activated / 1e9:.3f}",
            ]
        )
    console.print(
        table(
            "Table 8: language-model parameters, billions",
            ["Name", "Total paper", "Eq. 12", "exact", "Activated paper", "Eq. 12", "exact"],
            rows,
            caption="Eq. 12 and exact counts use the real architectures of the recipes. "
            "‡ the printed figure does not follow from the real architecture; StableLM rows "
            "print Phi-2's dims. See docs/param-count.md.",
        )
    )


def _render_one(r) -> None:
    head = [
        ["Eq. 12 (paper appendix A.1)", billions(r.formula_total), billions(r.formula_activated)],
        ["Exact (real architecture)", billions(r.exact_total), billions(r.exact_activated)],
    ]
    if r.paper_total_b is not None:
        head.insert(
            0, ["Paper (Table 8)", f"{r.paper_total_b:.1f}B", f"{r.paper_activated_b:.1f}B"]
        )
    moe = (
        f"{r.num_experts} experts, top-{r.top_k}, MoE layers {r.moe_layers}"
        if r.num_experts
        else "dense"
    )
    console.print(
        table(f"{r.name}: language model ({moe})", ["", "Total", "Activated"], head, caption=r.note)
    )
    comp_rows = [
        [name, millions(r.components[name]), millions(r.activated_components[name])]
        for name in r.components
        if r.components[name]
    ]
    comp_rows.append(["vision tower (separate)", millions(r.vision_params), "-"])
    comp_rows.append(["projector (separate)", millions(r.projector_params), "-"])
    console.print(table("Exact count by component", ["Component", "Total", "Activated"], comp_rows))
