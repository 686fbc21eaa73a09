"""`moetool predict` refuses what it cannot use with one error naming it (answers are tested on
the quickstart model in tests/integration/test_quickstart.py)."""

import pytest

from moetool.predict import PredictError, predict


def test_a_directory_without_config_is_named(tmp_path):
    with pytest.raises(PredictError, match="not a checkpoint directory"):
        predict(tmp_path, "What colour is the background?")


def test_a_missing_or_unreadable_image_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PredictError, match="no such file"):
        predict(tmp_path, "Hi?", tmp_path / "missing.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(PredictError, match="not a readable image"):
        predict(tmp_path, "Hi?", tmp_path / "not-an-image.png")


def test_an_empty_prompt_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PredictError, match="empty"):
        predict(tmp_path, "  ")
