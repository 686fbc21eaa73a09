import os

# No hub here or in CI: everything is built from configs and synthetic data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session counts from scratch: no cache left by an earlier run is trusted."""
    monkeypatch.setenv("MOETOOL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
