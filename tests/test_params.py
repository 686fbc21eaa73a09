import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from moetool.models.build import lvlm_config
from moetool.paper import TABLE8
from moetool.params import (
    Eq12Dims,
    count_config,
    count_model,
    count_recipe,
    count_table,
    eq12,
    formula_counts,
    recipe_dims,
)
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root

ROOT = recipes_root()


def test_eq12_golden_values():
    # Worked by hand from appendix A.1: vocab 10, width 4, 2 layers, FFN 8 (factor 3), one MoE
    # layer of 4 experts: 40 + 2 * (64 + 96 + 8) + 4 + 40 = 420 dense, + 3 * (96 + 8) + 4 * 4.
    toy = Eq12Dims(embedding=10, width=4, layers=2, ffn=8, ffn_factor=3, moe_layers=1, experts=4)
    assert eq12(toy, 4) == 748 and eq12(toy, 2) == 532
    assert eq12(dataclasses.replace(toy, moe_layers=0), 1) == 420
    # StableLM-1.6B (Table 8's real dims): dense, and x4-Top2 on every other of its 24 layers.
    dense = formula_counts(recipe_dims(load_recipe(ROOT / "stablelm-1.6b/dense.toml")))
    sparse = formula_counts(recipe_dims(load_recipe(ROOT / "stablelm-1.6b/moe-4x-top2.toml")))
    assert dense == (1_644_267_520, 1_644_267_520)
    assert sparse == (2_890_221_568, 2_059_601_920)


@pytest.mark.parametrize("row", TABLE8, ids=[r.name for r in TABLE8])
def test_formula_within_0_1b_of_consistent_paper_rows(row):
    total, activated = formula_counts(recipe_dims(load_recipe(ROOT / row.recipe)))
    close = abs(total / 1e9 - row.total_b) <= 0.1 and abs(activated / 1e9 - row.activated_b) <= 0.1
    # Only the OpenChat rows (printed base 6.7B = LLaMA-7B) are marked inconsistent.
    assert close == row.consistent
    assert row.consistent == ("OpenChat" not in row.name and "-7B×" not in row.name)


def test_openchat_increments_match_the_paper():
    rows = {r.name: r for r in count_table()}
    base = rows["OpenChat-7B"].exact_total
    for name in ("MoE-LLaVA-7B×4-Top2", "MoE-LLaVA-7B×4-Top2†"):
        paper = rows[name]
        assert abs((paper.exact_total - base) / 1e9 - (paper.paper_total_b - 6.7)) <= 0.15
        assert abs((paper.exact_activated - base) / 1e9 - (paper.paper_activated_b - 6.7)) <= 0.15


def test_eq12_dense_has_no_moe_terms():
    dims = Eq12Dims(10, 4, 2, 8, 3)
    assert eq12(dims, 4) == 420  # the toy of test_eq12_golden_values, dense
    assert formula_counts(dims) == (420, 420)


@pytest.mark.parametrize("family", ["llama", "phi", "stablelm", "qwen2", "mistral", "gemma2"])
def test_exact_dense_count_matches_transformers(family):
    from transformers import LlavaForConditionalGeneration

    recipe = load_recipe(ROOT / f"tiny/{family}.toml")
    model = LlavaForConditionalGeneration(lvlm_config(recipe.model, recipe.vision))
    exact = count_model(model)
    assert exact.total_params + exact.vision + exact.projector == model.num_parameters()
    lm = model.model.language_model.num_parameters()
    head = (
        0
        if recipe.model.tie_embeddings
        else model.lm_head.weight.numel()
        + (model.lm_head.bias.numel() if model.lm_head.bias is not None else 0)
    )
    assert exact.total_params == lm + head
    assert exact.vision == model.model.vision_tower.num_parameters()
    assert exact.total["other"] == 0
    assert exact.total == exact.activated
    assert (exact.total["lm_head"] == 0) == recipe.model.tie_embeddings


class ReferenceMoE(nn.Module):
    """A plain sparse FFN for counting: E copies of the dense MLP and a bias-free router."""

    def __init__(self, mlp: nn.Module, hidden: int, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(experts))
        self.router = nn.Linear(hidden, experts, bias=False)


@pytest.mark.parametrize("family", ["llama", "phi", "qwen3"])
def test_exact_sparse_count_matches_an_instantiated_sparse_model(family):
    from transformers import LlavaForConditionalGeneration

    recipe = load_recipe(ROOT / f"tiny/{family}.toml", ["moe.num_experts=3", "moe.layers=[1,2]"])
    dense = LlavaForConditionalGeneration(lvlm_config(recipe.model, recipe.vision))
    report = count_recipe(recipe, use_cache=False)
    sparse = copy.deepcopy(dense)
    layers = sparse.model.language_model.layers
    for i in recipe.moe_layer_indices:
        layers[i].mlp = ReferenceMoE(layers[i].mlp, recipe.model.hidden_size, 3)
    assert (
        report.exact_total + report.vision_params + report.projector_params
        == sparse.num_parameters()
    )
    per_expert = sum(p.numel() for p in dense.model.language_model.layers[1].mlp.parameters())
    assert report.exact_total - report.exact_activated == 2 * (3 - 2) * per_expert
    assert report.components["routers"] == 2 * recipe.model.hidden_size * 3


def test_table_has_twelve_rows_and_exact_matches_formula_where_eq12_is_exact():
    rows = count_table()
    assert [r.name for r in rows] == [r.name for r in TABLE8]
    for r in rows:
        # Eq. 12 ignores biases, GQA and Phi-2's single norm; exact counts differ only by those.
        assert abs(r.exact_total - r.formula_total) / r.exact_total < (
            0.12 if not r.paper_consistent else 0.001
        )


def test_cache_gives_identical_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETOOL_CACHE_DIR", str(tmp_path))
    recipe = load_recipe(ROOT / "tiny/llama.toml")
    fresh = count_recipe(recipe)
    assert list((tmp_path / "param-count").glob("*.json"))
    assert count_recipe(recipe) == fresh
    assert count_recipe(load_recipe(ROOT / "tiny/llama.toml", ["moe.top_k=1"])) != fresh


def test_count_config_llava_and_text_only(tmp_path):
    recipe = load_recipe(ROOT / "tiny/qwen2.toml")
    config = lvlm_config(recipe.model, recipe.vision)
    config.save_pretrained(tmp_path / "llava")
    config.text_config.save_pretrained(tmp_path / "text")
    from_recipe = count_recipe(recipe, use_cache=False)
    llava = count_config(tmp_path / "llava", num_experts=4, top_k=2, layers="interval")
    assert (llava.exact_total, llava.exact_activated, llava.vision_params) == (
        from_recipe.exact_total,
        from_recipe.exact_activated,
        from_recipe.vision_params,
    )
    assert (llava.formula_total, llava.formula_activated) == (
        from_recipe.formula_total,
        from_recipe.formula_activated,
    )
    text = count_config(tmp_path / "text" / "config.json")
    assert text.vision_params is None and text.projector_params is None
    assert text.exact_total == text.exact_activated
    with pytest.raises(ValueError, match="out of range"):
        count_config(tmp_path / "text", num_experts=4, layers="0,9")
    with pytest.raises(ValueError, match="--topk"):
        count_config(tmp_path / "text", num_experts=4, top_k=5)
    (tmp_path / "broken.json").write_text(json.dumps({"model_type": "qwen"}))
    with pytest.raises(ValueError, match="'qwen' is not a transformers architecture"):
        count_config(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="no such config"):
        count_config(tmp_path / "missing.json")


def test_meta_instantiation_holds_no_weights():
    from moetool.models.build import build_meta_lvlm

    recipe = load_recipe(ROOT / "openchat-7b/dense.toml")
    model = build_meta_lvlm(lvlm_config(recipe.model, recipe.vision))
    assert all(p.device == torch.device("meta") for p in model.parameters())


# The whole-VLM recipes: published parameter counts of their dense bases. Each figure is the
# whole model (language model, vision encoder, connector) as published, with its rounding:
# exact where the repository's safetensors metadata total is known, else the stated size.
PUBLISHED_BASES = {
    # recipe: (published parameters, tolerance, source)
    "qwen3-vl-2b/moe-4x-top2": (2_127_532_032, 0, "Qwen/Qwen3-VL-2B-Instruct safetensors total"),
    "qwen2.5-vl-3b/moe-4x-top2": (
        3_754_622_976,
        0,
        "Qwen/Qwen2.5-VL-3B-Instruct safetensors total",
    ),
    "smolvlm2-2.2b/moe-4x-top2": (
        2_246_784_880,
        0,
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct safetensors total",
    ),
    "gemma3-4b/moe-4x-top2": (4_300_079_472, 0, "google/gemma-3-4b-it safetensors total"),
    # "2.3B" in the InternVL3.5 model card's table (0.3B vision + 2.0B language).
    "internvl3.5-2b/moe-4x-top2": (2_300_000_000, 50_000_000, "InternVL3.5 model card"),
    # "894M params" on the repository page (its safetensors total, rounded).
    "llava-onevision-0.5b/moe-4x-top2": (
        894_000_000,
        500_000,
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf page",
    ),
}


def test_every_whole_vlm_recipe_has_a_published_count():
    from moetool.recipe.paths import bundled_recipes

    whole = {n for n in bundled_recipes() if load_recipe(ROOT / f"{n}.toml").model.base}
    # The quickstart's tiny random base has no published count (tests/test_quickstart_parts.py)
    assert whole - {"tiny/quickstart-qwen3-vl"} == set(PUBLISHED_BASES)


@pytest.mark.parametrize("name", PUBLISHED_BASES)
def test_whole_vlm_recipe_counts_agree_with_the_published_base(name):
    published, tolerance, _source = PUBLISHED_BASES[name]
    recipe = load_recipe(ROOT / f"{name}.toml")
    dense = count_config(recipe.model.config)  # no experts: the published dense model
    whole = dense.exact_total + dense.vision_params + dense.projector_params
    assert abs(whole - published) <= tolerance, whole
    # The recipe counts through count_config's code with its [moe] plan ...
    sparse = count_recipe(recipe, use_cache=False)
    plan = count_config(recipe.model.config, 4, 2, "interval")
    assert (sparse.exact_total, sparse.exact_activated) == (plan.exact_total, plan.exact_activated)
    assert (sparse.vision_params, sparse.projector_params) == (
        dense.vision_params,
        dense.projector_params,
    )
    # ... and Eq. 12 from the dims the loader filled equals Eq. 12 from the config itself.
    assert (sparse.formula_total, sparse.formula_activated) == (
        plan.formula_total,
        plan.formula_activated,
    )
    assert sparse.moe_layers == list(recipe.moe_layer_indices)
    assert dense.exact_total < sparse.exact_activated < sparse.exact_total
    # Top-2 of 4: each MoE layer holds 4 FFNs and runs 2, plus its router.
    ffn = dense.components["ffn"] // recipe.model.num_layers
    routers = len(recipe.moe_layer_indices) * recipe.model.hidden_size * 4
    assert sparse.exact_total - dense.exact_total == len(sparse.moe_layers) * 3 * ffn + routers
    assert sparse.exact_activated - dense.exact_activated == len(sparse.moe_layers) * ffn + routers
    # The head is tied as transformers ties it for that VLM.
    assert recipe.model.tie_embeddings == (dense.components["lm_head"] == 0)


def test_whole_vlm_count_cache_follows_the_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETOOL_CACHE_DIR", str(tmp_path / "cache"))
    folder = ROOT / "llava-onevision-0.5b"
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "r.toml").write_text(
        f'extends = "{folder}/moe-4x-top2.toml"\n[model]\nconfig = "config.json"\n'
    )
    first = count_recipe(load_recipe(tmp_path / "r.toml"))
    assert count_recipe(load_recipe(tmp_path / "r.toml")) == first  # cached
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 25  # the vision encoder: same [model] dims
    (tmp_path / "config.json").write_text(json.dumps(config))
    recount = count_recipe(load_recipe(tmp_path / "r.toml"))
    assert recount.vision_params < first.vision_params
    assert recount.exact_total == first.exact_total


@pytest.mark.parametrize(
    ("name", "total_b", "non_embedding_b"),
    [("qwen3-1.7b/dense", 1.7, 1.4), ("qwen3-4b/dense", 4.0, 3.6)],
)
def test_qwen3_language_models_match_their_model_cards(name, total_b, non_embedding_b):
    # Qwen3 model cards: "Number of Parameters: 1.7B / 4.0B; Non-Embedding: 1.4B / 3.6B".
    report = count_recipe(load_recipe(ROOT / f"{name}.toml"), use_cache=False)
    assert report.components["lm_head"] == 0  # tied
    assert round(report.exact_total / 1e9, 1) == total_b
    non_embedding = report.exact_total - report.components["embeddings"]
    assert round(non_embedding / 1e9, 1) == non_embedding_b
