"""Named architecture presets: the paper's real bases (dims only; weights come from a local
path) and tiny sizes for tests. Each preset is a bundled recipe's ``[model]`` and ``[vision]``."""

from __future__ import annotations

PRESETS: dict[str, str] = {
    # The paper's bases (Tables 1 and 8), CLIP-L/336 tower.
    "stablelm-1.6b": "stablelm-1.6b/dense",
    "qwen-1.8b": "qwen-1.8b/dense",
    "phi2-2.7b": "phi2-2.7b/dense",
    "openchat-7b": "openchat-7b/dense",
    # Tiny random models of real transformers families (hidden 64, 4 layers), for tests.
    "tiny-llama": "tiny/llama",
    "tiny-mistral": "tiny/mistral",
    "tiny-qwen2": "tiny/qwen2",
    "tiny-qwen3": "tiny/qwen3",
    "tiny-phi": "tiny/phi",
    "tiny-stablelm": "tiny/stablelm",
    "tiny-gemma2": "tiny/gemma2",
}


def preset_recipe(name: str):
    """The recipe behind a preset name; unknown names list the valid ones."""
    from moetool.recipe.load import load_recipe
    from moetool.recipe.paths import recipes_root

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return load_recipe(recipes_root() / f"{PRESETS[name]}.toml")
