"""Parameter counts: the paper's Eq. 12 on a recipe's dims, and exact counts of the real
architecture instantiated on the meta device (no weights, no download).

Counts cover the language model, as the paper's do; the vision tower and the projector are
reported beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool._version import __version__
from moetool.paper import TABLE8, Table8Row

if TYPE_CHECKING:
    from torch import nn

    from moetool.models.moe.config import MoEConfig
    from moetool.recipe.schema import Recipe

COMPONENTS = ("embeddings", "attention", "ffn", "experts", "routers", "norms", "lm_head", "other")


@dataclass(frozen=True)
class Eq12Dims:
    """The quantities of Eq. 12 (Table 8's columns)."""

    embedding: int  # vocabulary size
    width: int
    layers: int
    ffn: int
    ffn_factor: int
    moe_layers: int = 0
    experts: int = 1
    top_k: int = 1


def eq12(dims: Eq12Dims, experts: int) -> int:
    """Eq. 12 of the paper (appendix A.1), exactly as printed, for ``experts`` experts."""
    w = dims.width
    ffn = w * dims.ffn * dims.ffn_factor
    total = dims.embedding * w + dims.layers * (4 * w * w + ffn + 2 * w) + w + w * dims.embedding
    if dims.moe_layers:
        total += dims.moe_layers * (experts - 1) * (ffn + 2 * w)
        total += dims.moe_layers * (w * experts)
    return total


def formula_counts(dims: Eq12Dims) -> tuple[int, int]:
    """(total, activated): activated sets Experts = top-k, as appendix A.1 says."""
    return eq12(dims, dims.experts), eq12(dims, dims.top_k if dims.moe_layers else dims.experts)


def recipe_dims(recipe: Recipe) -> Eq12Dims:
    model = recipe.model
    moe = recipe.moe
    return Eq12Dims(
        embedding=model.vocab_size,
        width=model.hidden_size,
        layers=model.num_layers,
        ffn=model.ffn_hidden_size,
        ffn_factor=model.ffn_linears,
        moe_layers=len(recipe.moe_layer_indices),
        experts=moe.num_experts if moe else 1,
        top_k=moe.top_k if moe else 1,
    )


@dataclass(frozen=True)
class ExactCount:
    """Exact counts by component, for the whole sparse model and for one token's active path."""

    total: dict[str, int]
    activated: dict[str, int]
    vision: int | None
    projector: int | None

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def activated_params(self) -> int:
        return sum(self.activated.values())


def _decoder_layers(model: nn.Module):
    """The decoder layers: the first ModuleList whose items have an ``mlp`` module."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "mlp"):
            return module
    raise ValueError(f"{type(model).__name__}: found no decoder layers with an `mlp` module")


def _numel(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_model(
    model: nn.Module,
    moe_layers: tuple[int, ...] = (),
    num_experts: int = 1,
    top_k: int = 1,
) -> ExactCount:
    """Count an instantiated (meta or real) model by component.

    ``model`` is a LLaVA model or a causal LM. If its layers are dense, ``moe_layers`` says which
    layers the sparse model turns into ``num_experts`` copies of the FFN plus a bias-free router
    (hidden -> experts); activated counts keep ``top_k`` experts per MoE layer, routers included.
    """
    from moetool.models.bases import get_base
    from moetool.models.families import decoder_names
    from moetool.models.parts import connector_parameters, layer_child_part

    seen: set[int] = set()
    hidden_size = model.config.get_text_config().hidden_size
    family = decoder_names(model.config.get_text_config().model_type)
    inner = getattr(model, "model", model)
    vision = projector_count = None
    language_model = model
    if model.config.get_text_config() is not model.config:  # a VLM: its base says where
        base = get_base(model.config.model_type)
        projector_count = 0  # first: Qwen-VL's merger sits inside the vision encoder
        for param in connector_parameters(inner, base.connector):
            projector_count += 0 if id(param) in seen else param.numel()
            seen.add(id(param))
        vision = _numel(getattr(inner, base.vision), seen)
        language_model = getattr(inner, base.language_model)

    total = dict.fromkeys(COMPONENTS, 0)
    activated = dict.fromkeys(COMPONENTS, 0)
    layers = _decoder_layers(language_model)
    for index, layer in enumerate(layers):
        for child_name, child in layer.named_children():
            count = _numel(child, seen)
            component = layer_child_part(child_name, family)
            if component == "ffn" and index in moe_layers:
                total["experts"] += num_experts * count
                activated["experts"] += top_k * count
                total["routers"] += hidden_size * num_experts
                activated["routers"] += hidden_size * num_experts
                continue
            total[component] += count
            activated[component] += count
        own = sum(p.numel() for p in layer.parameters(recurse=False) if id(p) not in seen)
        total["other"] += own
        activated["other"] += own

    output_embeddings = (
        model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    )
    from torch import nn

    for module in model.modules():
        direct = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not direct:
            continue
        if isinstance(module, nn.Embedding):
            component = "embeddings"
        elif module is output_embeddings:
            component = "lm_head"
        elif "Norm" in type(module).__name__:
            component = "norms"
        else:
            component = "other"
        count = sum(p.numel() for p in direct)
        seen.update(id(p) for p in direct)
        total[component] += count
        activated[component] += count
    return ExactCount(total, activated, vision, projector_count)


@dataclass(frozen=True)
class ParamReport:
    """One row of ``moetool param-count`` (its JSON keys are documented in docs/param-count.md)."""

    name: str
    paper_total_b: float | None
    paper_activated_b: float | None
    formula_total: int
    formula_activated: int
    exact_total: int
    exact_activated: int
    vision_params: int | None
    projector_params: int | None
    components: dict[str, int]
    activated_components: dict[str, int]
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int | None = None
    top_k: int | None = None
    recipe: str | None = None
    paper_consistent: bool | None = None
    note: str = ""

    @classmethod
    def of(
        cls,
        name: str,
        dims: Eq12Dims,
        exact: ExactCount,
        moe_layers: tuple[int, ...],
        paper_row: Table8Row | None = None,
        recipe: str | None = None,
    ) -> ParamReport:
        """The row for a model of ``dims`` counted exactly as ``exact`` (dense when
        ``moe_layers`` is empty), with the paper's figures when it is a Table 8 row."""
        formula_total, formula_activated = formula_counts(dims)
        return cls(
            name=name,
            paper_total_b=paper_row.total_b if paper_row else None,
            paper_activated_b=paper_row.activated_b if paper_row else None,
            formula_total=formula_total,
            formula_activated=formula_activated,
            exact_total=exact.total_params,
            exact_activated=exact.activated_params,
            vision_params=exact.vision,
            projector_params=exact.projector,
            components=exact.total,
            activated_components=exact.activated,
            moe_layers=list(moe_layers),
            num_experts=dims.experts if moe_layers else None,
            top_k=dims.top_k if moe_layers else None,
            recipe=recipe,
            paper_consistent=paper_row.consistent if paper_row else None,
            note=paper_row.note if paper_row else "",
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cache_dir() -> Path:
    root = os.environ.get("MOETOOL_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moetool"
    return Path(root) / "param-count"


def _exact_for_recipe(recipe: Recipe, use_cache: bool) -> ExactCount:
    """Exact counts of the recipe's architecture, cached on disk by architecture and library
    versions (importing torch and transformers dominates a cold count). A whole-VLM recipe is
    counted from its base's published config, as ``count_config`` counts it."""
    moe_layers, experts, top_k = _moe_plan(recipe)
    if recipe.model.base:
        config_file = Path(recipe.model.config)
        architecture = {"config": hashlib.sha256(config_file.read_bytes()).hexdigest()}
    else:
        architecture = {
            "model": asdict(recipe.model) | {"path": ""},
            "vision": asdict(recipe.vision) | {"path": ""},
            "projector": asdict(recipe.projector),
        }
    key_data = {
        **architecture,
        "moe_layers": list(moe_layers),
        "experts": experts,
        "top_k": top_k,
        "transformers": metadata.version("transformers"),
        "moetool": __version__,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = _cache_dir() / f"{key}.json"
    if use_cache:
        try:
            cached = json.loads(cache_file.read_text())
            return ExactCount(**cached)
        except (OSError, ValueError, TypeError):
            pass
    if recipe.model.base:
        raw = _read_config(config_file)
        count = _count_config(raw, recipe.moe, config_file)[0]
    else:
        from moetool.models.build import build_meta_lvlm, lvlm_config

        model = build_meta_lvlm(lvlm_config(recipe.model, recipe.vision))
        count = count_model(model, moe_layers, experts, top_k)
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(asdict(count)))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only home only costs speed
    return count


def _moe_plan(recipe: Recipe) -> tuple[tuple[int, ...], int, int]:
    if recipe.moe is None:
        return (), 1, 1
    return recipe.moe_layer_indices, recipe.moe.num_experts, recipe.moe.top_k


def count_recipe(
    recipe: Recipe,
    recipe_label: str | None = None,
    paper_row: Table8Row | None = None,
    use_cache: bool = True,
) -> ParamReport:
    """Eq. 12 and exact counts for a recipe; paper figures when it is a Table 8 row."""
    if paper_row is None and recipe.paper.table8_row:
        paper_row = next((r for r in TABLE8 if r.name == recipe.paper.table8_row), None)
    return ParamReport.of(
        paper_row.name if paper_row else recipe.name,
        recipe_dims(recipe),
        _exact_for_recipe(recipe, use_cache),
        recipe.moe_layer_indices,
        paper_row,
        recipe_label,
    )


def count_table(use_cache: bool = True) -> list[ParamReport]:
    """All 12 rows of the paper's Table 8, each from its bundled recipe."""
    from moetool.recipe.load import load_recipe
    from moetool.recipe.paths import recipes_root

    root = recipes_root()
    return [
        count_recipe(load_recipe(root / row.recipe), row.recipe, row, use_cache) for row in TABLE8
    ]


def _read_config(config_file: Path) -> dict:
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{config_file}: no such config file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: not a readable JSON config ({err})") from None


def count_config(
    path: str | Path,
    num_experts: int | None = None,
    top_k: int = 2,
    layers: str = "interval",
) -> ParamReport:
    """Counts for a local transformers ``config.json`` (a VLM of a known base, a causal LM, or a
    sparse moetool checkpoint's config, counted with its own ``moe`` plan), with an optional
    MoE plan; no weights are read."""
    from moetool.models.bases import get_base, is_sparse_model_type
    from moetool.models.moe.config import MoEConfig, parse_layer_layout

    config_file = Path(path)
    if config_file.is_dir():
        config_file = config_file / "config.json"
    raw = _read_config(config_file)
    moe = None
    if num_experts is not None:
        try:
            layout = parse_layer_layout(layers)
        except ValueError as err:
            raise ValueError(f"--layers: {err}") from None
        moe = MoEConfig(num_experts=num_experts, top_k=top_k, layers=layout)
        flags = {"num_experts": "--experts", "top_k": "--topk"}
        problems = [(k, m) for k, m in moe.problems() if k in flags]
        if problems:
            raise ValueError("; ".join(f"{flags[k]}: {m}" for k, m in problems))

    model_type = raw.get("model_type")
    if is_sparse_model_type(model_type):  # the dense base, with the checkpoint's own plan
        if moe is not None:
            raise ValueError(
                f"{config_file} is a sparse checkpoint's config (its moe section is the plan); "
                "leave out --experts, --topk and --layers"
            )
        moe = MoEConfig.from_dict(raw.get("moe") or {})
        raw = {k: v for k, v in raw.items() if k not in ("moe", "moetool", "auto_map")}
        raw["model_type"] = get_base(model_type).model_type
    exact, dims, moe_layers = _count_config(raw, moe, config_file)
    return ParamReport.of(str(config_file), dims, exact, moe_layers)


def _count_config(
    raw: dict, moe: MoEConfig | None, config_file: Path
) -> tuple[ExactCount, Eq12Dims, tuple[int, ...]]:
    """Exact counts, Eq. 12's dims and the MoE layers of the dense model of config dict ``raw``
    (a VLM of a known base or a causal LM) with the plan ``moe`` (dense when None), built on the
    meta device. Shared by ``count_config`` and the whole-VLM recipes."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from moetool.models.bases import get_base, known_bases

    model_type = raw.get("model_type")
    try:
        config = AutoConfig.for_model(
            model_type, **{k: v for k, v in raw.items() if k != "model_type"}
        )
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not a transformers "
            f"architecture this install knows ({err})"
        ) from None
    text = config.get_text_config()
    with torch.device("meta"):
        if model_type in known_bases():
            model = AutoModelForImageTextToText.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    moe_layers: tuple[int, ...] = ()
    num_experts, top_k = (moe.num_experts, moe.top_k) if moe is not None else (1, 1)
    if moe is not None:
        problems = moe.problems(text.num_hidden_layers)
        if problems:
            raise ValueError("; ".join(f"--{key}: {message}" for key, message in problems))
        moe_layers = moe.layer_indices(text.num_hidden_layers)
    exact = count_model(model, moe_layers, num_experts, top_k)

    inner = getattr(model, "model", model)
    decoder = (
        getattr(inner, get_base(model_type).language_model)
        if model_type in known_bases()
        else model
    )
    mlp = _decoder_layers(decoder)[0].mlp
    dims = Eq12Dims(
        embedding=text.vocab_size,
        width=text.hidden_size,
        layers=text.num_hidden_layers,
        ffn=text.intermediate_size,
        ffn_factor=sum(isinstance(m, nn.Linear) for m in mlp.modules()),
        moe_layers=len(moe_layers),
        experts=num_experts,
        top_k=top_k,
    )
    return exact, dims, moe_layers
