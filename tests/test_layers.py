"""Imports flow one way: cli -> commands' modules -> {recipe -> models -> data} -> base.

Every import statement in moetool/ is read (function-level imports and ``TYPE_CHECKING`` blocks
included: a lazy import is still a dependency), and the test fails on an import cycle between
modules or on an import from a lower layer into a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moetool

PACKAGE = Path(moetool.__file__).parent

# Lowest first. A module may import its own layer's modules (without a cycle) and lower layers.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("moetool._version", "moetool.io", "moetool.paper", "moetool.checkpoint_io")),
    ("data", ("moetool.data",)),
    ("models", ("moetool.models",)),
    ("recipe", ("moetool.recipe",)),
    (
        "commands",
        (
            "moetool.upcycle",
            "moetool.params",
            "moetool.convert",
            "moetool.export",
            "moetool.predict",
            "moetool.eval",
            "moetool.routing",
            "moetool.train",
            "moetool.tiny",
            "moetool.tiny_vlm",
            "moetool.smoke",
            "moetool.quickstart",
            "moetool.vllm_model",
            "moetool.vllm_plugin",
        ),
    ),
    ("cli", ("moetool.cli", "moetool.__main__")),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The moetool modules that ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = subs if all(s in modules for s in subs) else [base, *subs]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def layer_of(name: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    # The package root is the public facade (version, Auto-class registration): it is on top.
    unplaced = [m for m in all_modules() if m != "moetool" and layer_of(m) is None]
    assert unplaced == []


def layer_name(name: str) -> str:
    return "package root" if name == "moetool" else LAYERS[layer_of(name)][0]


def test_no_upward_imports():
    # Nothing imports the package root by name (it would import the Auto-class registration).
    top = len(LAYERS)
    upward = [
        f"{src} ({layer_name(src)}) imports {dst} ({layer_name(dst)})"
        for src, targets in import_graph().items()
        if src != "moetool"
        for dst in sorted(targets)
        if (top if dst == "moetool" else layer_of(dst)) > layer_of(src)
    ]
    assert upward == []


def test_models_never_import_recipe():
    graph = import_graph()
    offending = [
        (src, dst)
        for src, targets in graph.items()
        if src.startswith("moetool.models")
        for dst in targets
        if dst.startswith("moetool.recipe")
    ]
    assert offending == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle_detects_cycles(graph, expected):
    assert find_cycle(graph) == expected


def test_imports_of_resolves_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "moetool"
    (pkg / "models").mkdir(parents=True)
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from moetool.recipe.schema import Recipe\n"
        "def f():\n    from . import parts\n    import moetool.io\n"
    )
    (pkg / "models" / "build.py").write_text(source)
    modules = {m: Path() for m in ("moetool.recipe.schema", "moetool.models.parts", "moetool.io")}
    found = imports_of("moetool.models.build", pkg / "models" / "build.py", modules)
    assert found == {"moetool.recipe.schema", "moetool.models.parts", "moetool.io"}
