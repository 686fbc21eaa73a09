import os
import re

# No hub here or in CI: everything is built from configs and synthetic data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Under pytest-xdist (`-n`, as the README's test command runs) two workers may each launch
# torchrun at once: each worker's launches rendezvous on a port of its own (torchrun reads
# PET_MASTER_PORT for --master-port; 29500, its default, without xdist). Fixed ports below the
# kernel's ephemeral range, so no other socket of the run is handed one of them.
# Each worker and the commands it starts compute on one thread: two workers' OpenMP pools on
# two cores spin against each other (the quickstart ran 3.5x slower beside another worker).
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ.setdefault(
        "PET_MASTER_PORT", str(29500 + 10 * (1 + int(os.environ["PYTEST_XDIST_WORKER"][2:])))
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# The longest modules (measured with --durations on 2 cores: the quickstart ~390 s, training
# ~340 s, eval ~200 s), then the rest of the integration tier, then the unit tier: under
# pytest-xdist (`-n 2 --dist loadfile`, the README's test command) a long module then starts
# while the other worker takes the short ones, instead of last with the other worker idle.
LONGEST_FIRST = ("test_quickstart.py", "test_training.py", "test_eval.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        if item.path.parent.name == "integration" and name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (item.get_closest_marker("integration") is None)

    items.sort(key=rank)  # stable: each module's own order is kept
