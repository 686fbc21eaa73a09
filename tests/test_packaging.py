import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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
