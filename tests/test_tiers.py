"""Two test tiers: plain `pytest` runs the unit tier, `pytest -m integration` the slow
multi-process and end-to-end tests (`@pytest.mark.integration`: every test under
tests/integration, and a few elsewhere); the README's test command and CI run both."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TWO_TESTS = """
import pytest


def test_fast():
    pass


@pytest.mark.integration
def test_slow():
    pass
"""


def collect(*args: str) -> subprocess.CompletedProcess:
    """``pytest --collect-only`` with the project's configuration (pyproject.toml)."""
    argv = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir"]
    argv += [str(ROOT), "--collect-only", "-p", "no:cacheprovider", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)


def selected(tmp_path: Path, *args: str) -> list[str]:
    """The test names a pytest command line selects from one unmarked and one integration
    test."""
    (tmp_path / "test_two.py").write_text(TWO_TESTS)
    proc = collect(*args, str(tmp_path / "test_two.py"))
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr
    return re.findall(r"(?:::|<Function )(test_\w+)", proc.stdout)  # with or without -q


def pytest_args(command: str) -> list[str]:
    """The arguments of the `python -m pytest` call in a shell command line."""
    match = re.search(r"python -m pytest((?:(?!&&|;|\|).)*)", command)
    assert match, command
    return shlex.split(match[1])


def test_plain_pytest_runs_the_unit_tier_and_m_integration_the_other(tmp_path):
    assert selected(tmp_path) == ["test_fast"]
    assert selected(tmp_path, "-m", "integration") == ["test_slow"]


def test_every_test_under_tests_integration_is_in_the_integration_tier():
    proc = collect("tests/integration")
    assert proc.returncode == 5, proc.stdout[-3000:]  # no test collected: all deselected
    assert int(re.search(r"(\d+) deselected", proc.stdout)[1]) > 0


def readme_and_ci_test_commands() -> list[str]:
    """The README's test command (its second set-up command) and `.ci/run`'s."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    commands = [line for line in commands if "pytest" in line]  # the test command, not the first
    commands += [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert len(commands) == 2
    return commands


def test_the_readme_and_ci_test_commands_run_both_tiers(tmp_path):
    for command in readme_and_ci_test_commands():
        assert sorted(selected(tmp_path, *pytest_args(command))) == ["test_fast", "test_slow"]


def test_the_test_command_needs_only_plugins_the_dev_extra_installs():
    """The test command runs on pytest-xdist workers: a fresh venv gets the plugin from the
    `dev` extra (a venv with it installed by hand hid its absence once)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = {Requirement(r).name for r in project["optional-dependencies"]["dev"]}
    for command in readme_and_ci_test_commands():
        if {"-n", "--dist"} & set(pytest_args(command)):
            assert "pytest-xdist" in dev, "the test command uses -n: pytest-xdist in `dev`"
