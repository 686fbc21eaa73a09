"""Recipes: the TOML schema of every paper variant, and its validating loader."""

from moetool.recipe.load import RecipeError, load_recipe, parse_override, recipe_from_dict
from moetool.recipe.schema import Recipe, resolve_moe_layers

__all__ = [
    "Recipe",
    "RecipeError",
    "load_recipe",
    "parse_override",
    "recipe_from_dict",
    "resolve_moe_layers",
]
