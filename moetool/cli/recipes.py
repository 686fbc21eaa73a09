"""``moetool recipes``: list the bundled recipes, or validate and show one."""

from __future__ import annotations

from typing import Annotated

import typer

from moetool.cli.render import console, fail, print_json, table


def recipes(
    recipe: Annotated[
        str | None,
        typer.Argument(help="Validate and show this recipe (file or bundled name)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key, e.g. --set moe.top_k=1."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the bundled recipes, or validate one (with --set overrides) and show it resolved."""
    from moetool.quickstart import load_quickstart_recipe, whole_vlm_quickstart
    from moetool.recipe import RecipeError, load_recipe
    from moetool.recipe.load import recipe_to_dict
    from moetool.recipe.paths import bundled_recipes, recipes_root, resolve_recipe

    if recipe is None:
        if overrides:
            fail("--set goes with a RECIPE")
        rows = []
        for name in bundled_recipes():
            quickstart = whole_vlm_quickstart(name)  # its [model] dims: its tiny base's
            try:
                if quickstart is not None:
                    r = load_quickstart_recipe(quickstart)
                else:
                    r = load_recipe(recipes_root() / f"{name}.toml")
            except RecipeError as err:
                fail(str(err))
            moe = _describe_moe(r)
            rows.append(
                {
                    "recipe": name,
                    "name": r.name,
                    "model_type": r.model.base or r.model.model_type,
                    "moe": moe,
                    "stages": list(r.stages.present()),
                    "paper": list(r.paper.tables),
                }
            )
        if as_json:
            print_json(rows)
            return
        stage_marks = {"pretrain": "I", "instruct": "II", "moe_tune": "III"}
        console.print(
            table(
                f"Bundled recipes ({recipes_root()})",
                ["Recipe", "Base", "MoE", "Stages", "Paper"],
                [
                    [
                        x["recipe"],
                        x["model_type"],
                        x["moe"],
                        " ".join(stage_marks[s] for s in x["stages"]),
                        ", ".join(t.removeprefix("Table ") for t in x["paper"]),
                    ]
                    for x in rows
                ],
                caption="Stages: I pretrain, II instruct, III moe-tune. Paper: table numbers.",
                justify="left",
            )
        )
        return
    try:
        loaded = load_recipe(resolve_recipe(recipe), overrides or [])
    except RecipeError as err:
        fail(str(err))
    data = recipe_to_dict(loaded)
    data["moe_layer_indices"] = list(loaded.moe_layer_indices)
    if as_json:
        print_json(data)
    else:
        console.print(f"[green]valid[/] {recipe}")
        console.print_json(data=data)


def _describe_moe(recipe) -> str:
    if recipe.moe is None:
        return "dense"
    layers = recipe.moe.layers
    layout = layers if isinstance(layers, str) else ",".join(map(str, layers))
    return f"{recipe.moe.num_experts}x top-{recipe.moe.top_k} {layout}"
