"""``moetool data check``: a recipe's stages resolved to what their training would read (data
files, image folder, tokenizer, template, image tokens, ``max_length``) and checked by
``data.check`` before any GPU is used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moetool.data.check import Progress, StageCheck, check_stage
from moetool.recipe.schema import STAGE_NAMES, Recipe


class PreflightError(ValueError):
    """The check cannot run: no such stage, no tokenizer, no image folder."""


@dataclass
class RecipeCheck:
    recipe: str
    skip_bad_samples: bool
    workers: int
    stages: dict[str, StageCheck]

    @property
    def exit_code(self) -> int:
        """1 when a stage's training would stop on its data, else 0."""
        verdicts = [s.verdict(self.skip_bad_samples) for s in self.stages.values()]
        return 1 if "stop" in verdicts else 0

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe,
            "exit_code": self.exit_code,
            "skip_bad_samples": self.skip_bad_samples,
            "workers": self.workers,
            "stages": {n: s.to_json(self.skip_bad_samples) for n, s in self.stages.items()},
            "problems": [
                dict(stage=n, **p.to_json()) for n, s in self.stages.items() for p in s.problems
            ],
        }


def _processor(recipe: Recipe):
    """The processor stage I starts with (later stages' checkpoints carry the same tokenizer):
    the base's tokenizer from ``model.path``, or the offline one of a tiny recipe."""
    from moetool.models.build import base_tokenizer, build_processor
    from moetool.tiny import build_tokenizer

    if recipe.model.path:
        if not Path(recipe.model.path).is_dir():
            raise PreflightError(
                f"model.path: {recipe.model.path!r} is not a local checkpoint directory "
                "(its tokenizer encodes the data)"
            )
        tokenizer = base_tokenizer(recipe.model)
    else:
        tokenizer = build_tokenizer(recipe.model.vocab_size, recipe.data.template)
    return build_processor(recipe.vision, tokenizer)


def check_recipe_data(
    recipe: Recipe,
    stages: list[str] | None = None,
    recipe_dir: str | Path = ".",
    progress: Progress | None = None,
) -> RecipeCheck:
    """Check the data of ``stages`` (default: every stage the recipe has) over
    ``data.num_workers`` processes; paths resolve as training resolves them (``data.root``
    and ``data.image_folder`` under ``recipe_dir``, the working directory for the CLI)."""
    from moetool.data.preprocess import Preprocessor
    from moetool.data.templates import get_template

    if recipe.model.base:
        raise PreflightError(
            f"model.base = {recipe.model.base!r}: `data check` reads LLaVA-layout recipes for "
            "now; a whole-VLM stage names (or, with data.skip_bad_samples, skips and counts) "
            "its bad samples as it meets them"
        )
    present = recipe.stages.present()
    for name in stages or []:
        if name not in STAGE_NAMES:
            raise PreflightError(
                f"--stage {name!r}: no such stage; known: {', '.join(STAGE_NAMES)}"
            )
        if name not in present:
            raise PreflightError(f"--stage {name}: the recipe has no [stages.{name}] section")
    names = [n for n in present if stages is None or n in stages]
    # As train.runner's stage plan resolves them.
    data_root = Path(recipe_dir) / recipe.data.root
    image_folder = Path(recipe_dir) / recipe.data.image_folder
    if not image_folder.is_dir():
        raise PreflightError(f"data.image_folder: {image_folder} is not a directory")
    processor = _processor(recipe)
    out = {}
    for name in names:
        stage = present[name]
        preprocessor = Preprocessor(
            processor,
            get_template(stage.template or recipe.data.template),
            recipe.vision.image_tokens,
            stage.max_length,
            stage.image_aspect_ratio,
        )
        out[name] = check_stage(
            name,
            [data_root / f for f in stage.data],
            image_folder,
            preprocessor,
            workers=recipe.data.num_workers,
            progress=progress,
        )
    return RecipeCheck(recipe.name, recipe.data.skip_bad_samples, recipe.data.num_workers, out)
