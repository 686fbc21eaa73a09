import os
import re

# No hub here or in CI: everything is built from configs and synthetic data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session counts from scratch: no cache left by an earlier run is trusted."""
    monkeypatch.setenv("MOETOOL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


# Third-party output that moetool's commands keep out of theirs: tqdm bars (transformers'
# "Loading weights", lmms-eval's), DeepSpeed's and torch's log lines, DeepSpeed's build message.
LIBRARY_CHATTER = re.compile(
    r"\d+%\|"  # a tqdm bar
    r"|\bit/s\]"
    r"|Loading weights|Writing model shards"
    r"|\[(DEBUG|INFO|WARNING)\]"  # DeepSpeed's logger format
    r"|^[DIW]\d{4} \d\d:\d\d:\d\d"  # torch's glog-style lines
    r"|built successfully",
    re.MULTILINE,
)


def chatter_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if LIBRARY_CHATTER.search(line)]


@pytest.fixture
def library_chatter():
    """The lines of a text that a third-party library printed on its own."""
    return chatter_lines
