"""TOML -> ``Recipe``: ``extends`` chains, ``--set`` overrides, and all-at-once validation.

A whole-VLM recipe (``[model] base`` set) gets its ``[model]`` dims from the base's published
config.json (``model.config``, written relative to the file that sets it) when it is read.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from moetool.models.arch import PUBLISHED_DIMS, published_dims
from moetool.recipe.schema import Recipe


class RecipeError(ValueError):
    """Every problem found in a recipe, each naming its TOML key and where it came from."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = len(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=v`` -> (``a.b``, value); v is read as a TOML value, else taken as a plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError("--set", [f"{text!r}: expected KEY=VALUE, e.g. moe.num_experts=8"])
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _read_toml(path: Path, chain: tuple[Path, ...]) -> dict:
    """Read a recipe file, merging the files it ``extends`` (paths relative to the file)."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(str(chain[0]), [f"extends: cycle {cycle}"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise RecipeError(str(path), [f"no such recipe file{where}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(str(path), [f"not valid TOML: {err}"]) from None
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(
            str(path), [f"extends: expected a path or a list of paths, got {parents!r}"]
        )
    _resolve_model_config(data, path.parent)
    merged: dict = {}
    for parent in parents:  # later files win, and the file itself wins over all of them
        merged = _deep_merge(merged, _read_toml((path.parent / parent).resolve(), (*chain, path)))
    return _deep_merge(merged, data)


def _resolve_model_config(data: dict, folder: Path) -> None:
    """Make a ``[model] config`` path written relative to ``folder`` absolute, in place."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("config"), str) and model["config"]:
        model["config"] = str((folder / model["config"]).resolve())


_UNREAD_DIMS = {"model_type": "", "tie_embeddings": False, "attention_bias": False}


def _with_published_dims(data: dict, errors: list[str]) -> dict:
    """``data`` with a whole-VLM recipe's ``[model]`` dims filled from its base's published
    config.

    Dims already present must equal the config's (the plain-data form of a loaded recipe has
    them). A config that cannot be read leaves placeholders: ``ModelSection.problems()`` says
    why."""
    model = data.get("model")
    if not (isinstance(model, dict) and model.get("base") and isinstance(model["base"], str)):
        return data
    model = dict(model)
    data = {**data, "model": model}
    config = model.get("config")
    try:
        dims = published_dims(config, model["base"]) if isinstance(config, str) else None
    except ValueError:
        dims = None
    if dims is None:
        for key in PUBLISHED_DIMS:
            model.setdefault(key, _UNREAD_DIMS.get(key, 0))
        return data
    for key, value in dims.items():
        if key in model and model[key] != value:
            errors.append(
                f"model.{key}: {model[key]!r} differs from {value!r} in model.config {config} "
                "(a whole-VLM recipe takes its dims from the base's published config)"
            )
        model[key] = value
    return data


def _deep_merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "extra":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(data: dict, key: str, value: Any) -> str | None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"{'.'.join(parts[: i + 1])} is a value, not a section"
        node = child
    node[parts[-1]] = value
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if isinstance(tp, type):
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "dict": "table",
        }.get(tp.__name__, tp.__name__)
    return str(tp)


_INVALID: Any = object()  # a value that failed its check (None is a valid value)


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the converted value."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a [{key}] table, got {value!r}")
            return _INVALID
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        errors.append(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return _INVALID
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], key, errors)
        for option in options:
            converted = _convert(value, option, key, [])
            if converted is not _INVALID:
                return converted
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return _INVALID
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a {_type_name(tp)}, got {value!r}")
            return _INVALID
        item_tp = get_args(tp)[0]
        items = tuple(_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value))
        return _INVALID if _INVALID in items else items
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    name = _type_name(tp)
    errors.append(f"{key}: expected {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r}")
    return _INVALID


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``, appending every problem to ``errors``.

    A key whose value is wrong falls back to its default so that the other checks still run;
    problems on keys already reported are not repeated. Returns ``_INVALID`` when a required key
    is missing or wrong.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    path = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            errors.append(
                f"{path}{key}: unknown key; [{prefix or 'top level'}] keys are {', '.join(fields)}"
            )
    kwargs: dict[str, Any] = {}
    failed: set[str] = set()
    for name, f in fields.items():
        optional = type(None) in get_args(hints[name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in data:
            value = _convert(data[name], hints[name], f"{path}{name}", errors)
            if value is not _INVALID:
                kwargs[name] = value
                continue
            failed.add(name)
            if required and not optional:
                continue
        elif required and not optional:
            errors.append(f"{path}{name}: required key is missing")
            failed.add(name)
            continue
        if required:
            kwargs[name] = None
    if any(
        name not in kwargs
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ):
        return _INVALID
    instance = cls(**kwargs)
    errors.extend(
        f"{path}{key}: {message}"
        for key, message in instance.problems()
        if key.split(".")[0] not in failed
    )
    return instance


def recipe_from_dict(
    data: dict, source: str = "<recipe>", errors: list[str] | None = None
) -> Recipe:
    """Validate a recipe given as nested dicts; raises ``RecipeError`` listing every problem
    (``errors`` may carry problems found earlier, e.g. in ``--set`` overrides)."""
    errors = list(errors or [])
    data = _with_published_dims(data, errors)
    recipe = _build(Recipe, data, "", errors)
    if errors or recipe is _INVALID:
        raise RecipeError(source, errors)
    return recipe


def load_recipe(path: str | Path, overrides: typing.Sequence[str] | None = ()) -> Recipe:
    """Load a TOML recipe (following ``extends``) and apply ``--set KEY=VALUE`` overrides."""
    path = Path(path)
    data = _read_toml(path.resolve(), ())
    errors: list[str] = []
    for text in overrides or ():
        try:
            key, value = parse_override(text)
        except RecipeError as err:
            errors.extend(f"--set {p}" for p in err.problems)
            continue
        if key == "model.config" and isinstance(value, str) and value:
            value = str(Path(value).resolve())  # relative to the working directory
        elif key == "model" and isinstance(value, dict):
            _resolve_model_config({"model": value}, Path.cwd())
        problem = _set_dotted(data, key, value)
        if problem:
            errors.append(f"--set {key}: {problem}")
    model = data.get("model")
    if isinstance(model, dict) and model.get("base"):
        for key in [k for k in PUBLISHED_DIMS if k in model]:
            del model[key]  # reported once here, not again against the config's value
            errors.append(
                f"model.{key}: is read from model.config in a whole-VLM recipe (model.base = "
                f"{model['base']!r}); remove it: the base's published config is the one source"
            )
    return recipe_from_dict(data, str(path), errors)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The plain-data form of a recipe (tuples as lists, absent sections dropped) for snapshots."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None
            }
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(recipe)
