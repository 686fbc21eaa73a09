"""The reference docs follow the code: every command and option of the Typer app is in
docs/cli.md, every recipe key (with its default and allowed values) in docs/recipe-reference.md,
and every relative link in docs/*.md and README.md points at an existing file and heading."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest
import typer

from moetool.cli.app import app
from moetool.recipe import schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
RECIPE_DOC = DOCS / "recipe-reference.md"


# Markdown helpers ---------------------------------------------------------------------------


def prose_lines(path: Path) -> list[str]:
    """The file's lines with fenced code blocks blanked (their `#` lines are not headings)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading text without backticks, text up to the next heading of the same or a higher
    level) for every heading of a Markdown file."""
    lines = prose_lines(path)
    heads = []
    for i, line in enumerate(lines):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            heads.append((i, len(match[1]), match[2].replace("`", "").strip()))
    out = []
    for n, (i, level, text) in enumerate(heads):
        end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.append((text, "\n".join(lines[i + 1 : end])))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading, _ in sections(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


# (a) CLI reference --------------------------------------------------------------------------


def command_tree() -> dict[tuple[str, ...], object]:
    """Every command object of the app by its path: () is `moetool`, groups and their
    sub-commands included."""
    found: dict[tuple[str, ...], object] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = command_tree()


def long_flags(command) -> list[str]:
    flags = []
    for param in command.params:
        if param.param_type_name == "option":
            flags += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
    return flags


def heading_of(path: tuple[str, ...]) -> str:
    return " ".join(("moetool", *path))


@pytest.mark.parametrize("path", list(COMMANDS), ids=[heading_of(p) for p in COMMANDS])
def test_every_command_and_option_is_in_the_cli_reference(path):
    documented = dict(sections(CLI_DOC))
    heading = heading_of(path)
    assert heading in documented, f"docs/cli.md has no heading `{heading}`"
    missing = [f for f in long_flags(COMMANDS[path]) if not mentions(documented[heading], f)]
    assert not missing, f"docs/cli.md, section `{heading}`: options {missing} are not documented"


@pytest.mark.parametrize("path", list(COMMANDS), ids=[heading_of(p) for p in COMMANDS])
def test_every_option_explains_itself_in_help(path):
    bare = [
        param.opts[0]
        for param in COMMANDS[path].params
        if param.param_type_name == "option" and not (param.help or "").strip()
    ]
    assert not bare, f"`{heading_of(path)} --help`: options {bare} have no help text"


def test_the_cli_reference_documents_only_existing_commands():
    existing = {heading_of(p) for p in COMMANDS}
    stale = [h for h, _ in sections(CLI_DOC) if h.split(" ")[0] == "moetool" and h not in existing]
    assert not stale, f"docs/cli.md documents commands the app does not have: {stale}"


# (b) Recipe reference -----------------------------------------------------------------------


def _dataclass_of(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def recipe_tables() -> dict[type, list[str]]:
    """Each recipe dataclass and the TOML tables it is read from ("" = the top level)."""
    tables: dict[type, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        tables.setdefault(cls, []).append(prefix)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            child = _dataclass_of(hints[f.name])
            if child is not None:
                walk(child, f"{prefix}.{f.name}" if prefix else f.name)

    walk(schema.Recipe, "")
    return tables


TABLES = recipe_tables()
# Keys the loader reads besides the dataclass fields.
EXTRA_KEYS = {schema.Recipe: ["extends"]}
# Registries whose names the docs list as a key's allowed values.
REGISTRY_VALUES = {
    (schema.ModelSection, "model_type"): lambda: schema.known_families(),
    (schema.MoEConfig, "layers"): lambda: list(schema.LAYER_LAYOUTS),
    (schema.StageSection, "trainable"): lambda: list(schema.TRAINABLE_PARTS),
    (schema.DataSection, "template"): lambda: list(_templates()),
}


def _templates():
    from moetool.data.templates import TEMPLATES

    return TEMPLATES


def recipe_section(cls) -> tuple[str, str]:
    """The docs section of a recipe dataclass: the heading naming one of its tables."""
    for heading, text in sections(RECIPE_DOC):
        for table in TABLES[cls]:
            if (table == "" and heading.lower() == "top level") or (
                table and f"[{table}]" in heading
            ):
                return heading, text
    names = ["Top level" if t == "" else f"[{t}]" for t in TABLES[cls]]
    raise AssertionError(f"docs/recipe-reference.md has no heading naming {' or '.join(names)}")


def key_rows(text: str) -> dict[str, dict[str, str]]:
    """Rows of the section's key tables (header starting with `key`): key -> column -> cell."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
        elif header[0] == "key" and not set(cells[0]) <= {"-", ":"}:
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows[key] = dict(zip(header, cells, strict=False))
    return rows


def default_text(f: dataclasses.Field) -> str | None:
    """How the docs write a field's default; None where there is none to compare."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING and f.default_factory in (dict, tuple):
        value = f.default_factory()
    else:
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


@pytest.mark.parametrize("cls", list(TABLES), ids=[c.__name__ for c in TABLES])
def test_every_recipe_key_is_in_the_recipe_reference(cls):
    heading, text = recipe_section(cls)
    rows = key_rows(text)
    where = f"docs/recipe-reference.md, section `{heading}`"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = [*fields, *EXTRA_KEYS.get(cls, [])]
    missing = [k for k in keys if k not in rows]
    assert not missing, f"{where}: keys {missing} have no row in a `key` table"
    stale = [k for k in rows if k not in keys]
    assert not stale, f"{where}: documents keys the schema does not have: {stale}"

    hints = typing.get_type_hints(cls, vars(schema))
    for name, f in fields.items():
        row = rows[name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            assert "required" in row.get("type", ""), f"{where}: `{name}` is required"
        expected = default_text(f)
        if expected is not None and "default" in row:
            documented = row["default"].replace("`", "").strip()
            assert documented == expected, f"{where}: `{name}` defaults to {expected}"
        allowed = " ".join(row.values())
        values = [
            json.dumps(v)
            for v in typing.get_args(hints[name])
            if typing.get_origin(hints[name]) is typing.Literal
        ]
        values += [f"`{v}`" for v in REGISTRY_VALUES.get((cls, name), lambda: [])()]
        absent = [v for v in values if not mentions(allowed, v.strip("`"))]
        assert not absent, f"{where}: `{name}` allows {absent}, not listed"


# (c) Links ----------------------------------------------------------------------------------

PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def relative_links(path: Path) -> list[str]:
    text = "\n".join(prose_lines(path))
    text = re.sub(r"`[^`\n]*`", "", text)  # links inside code spans are not links
    targets = LINK.findall(text)
    targets += [m[1] for line in text.splitlines() if (m := REFERENCE.match(line))]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_at_existing_files(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
