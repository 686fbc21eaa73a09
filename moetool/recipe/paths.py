"""Where the bundled recipes live, and how a recipe argument is resolved."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moetool.recipe.load import RecipeError


def recipes_root() -> Path:
    """The bundled recipes: ``recipes/`` of a source checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("moetool") / "recipes"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or a bundled recipe name such as ``qwen-1.8b/moe-4x-top2``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = recipes_root()
    for candidate in (root / path, root / path.with_suffix(".toml")):
        if candidate.is_file():
            return candidate
    raise RecipeError(
        str(name_or_path),
        [
            f"no such recipe file, and no bundled recipe of that name under {root} "
            "(list them with `moetool recipes`)"
        ],
    )


def bundled_recipes() -> list[str]:
    """Names of the bundled recipes (fragments, whose names start with '_', excluded)."""
    root = recipes_root()
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.toml")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
    )
