import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "moetool").rglob("__init__.py")
    }
    assert listed == found | {"moetool.recipes"}
    assert config["package-dir"] == {"moetool.recipes": "recipes"}


def test_importing_moetool_does_not_import_torch():
    import subprocess

    code = (
        "import sys, moetool, moetool.cli.app, moetool.recipe, moetool.params; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def locked_versions() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not any(c in version for c in "<>=,; "), line
        assert canonicalize_name(name) not in pins, f"{name} pinned twice"
        pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_dependency_inside_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    assert "moetool" not in pins  # pip refuses to constrain the editable install itself
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_the_set_up_commands_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert all(" -c constraints.txt -e " in command for command in commands)
    assert " -c constraints.txt -e '.[dev]'" in (REPO / ".ci/run").read_text()


def test_the_vllm_plugin_is_an_entry_point_that_needs_no_vllm_to_import():
    """vLLM runs every ``vllm.general_plugins`` entry point in each of its processes; moetool's
    must exist, and importing it must not need vLLM (which is not a dependency)."""
    import importlib.metadata
    import subprocess
    import sys

    (plugin,) = [
        e
        for e in importlib.metadata.entry_points(group="vllm.general_plugins")
        if e.name == "moetool"
    ]
    assert plugin.value == "moetool.vllm_plugin:register"
    code = (
        "import sys, moetool.vllm_plugin as p; assert callable(p.register); "
        "assert 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
