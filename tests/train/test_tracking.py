"""moetool.train.tracking: the tracker a recipe asks for, and what it needs."""

import importlib.util

import pytest

from moetool.recipe import RecipeError, load_recipe
from moetool.recipe.load import recipe_to_dict
from moetool.recipe.paths import recipes_root
from moetool.train import checkpoints
from moetool.train.tracking import NoTracker, TrackingError, check_available, open_tracker


def test_a_missing_tracking_package_is_named_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(TrackingError, match=r"needs the wandb package: pip install 'moetool\["):
        check_available("wandb")
    check_available("none")
    check_available("tensorboard")


def test_report_to_is_validated_and_none_opens_no_tracker(tmp_path):
    tiny = recipes_root() / "tiny/llama.toml"
    with pytest.raises(RecipeError, match="tracking.report_to"):
        load_recipe(tiny, ["tracking.report_to=mlflow"])
    assert isinstance(open_tracker("none", tmp_path, "p", "n", {}, 1), NoTracker)
    assert list(tmp_path.iterdir()) == []


def test_where_metrics_go_is_not_part_of_the_runs_fingerprint(tmp_path):
    tiny = recipes_root() / "tiny/llama.toml"
    prints = [
        checkpoints.fingerprint(
            recipe_to_dict(load_recipe(tiny, overrides)), "instruct", [], 1, None
        )
        for overrides in ([], ["tracking.report_to=tensorboard", "tracking.project=x"])
    ]
    assert prints[0] == prints[1]
    other = load_recipe(tiny, ["stages.instruct.lr=1e-3"])
    assert checkpoints.fingerprint(recipe_to_dict(other), "instruct", [], 1, None) != prints[0]
