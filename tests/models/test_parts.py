"""Stage policy parts of every parameter, by each family's exact decoder names."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from moetool.models.build import lvlm_config
from moetool.models.families import get_family, known_families
from moetool.models.parts import layer_child_part, parameter_parts, set_trainable
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm


def meta_lvlm(family: str):
    recipe = load_recipe(recipes_root() / f"tiny/{family}.toml")
    with torch.device("meta"):
        return LlavaForConditionalGeneration(lvlm_config(recipe.model, recipe.vision)), recipe


@pytest.mark.parametrize("family", known_families())
def test_every_language_model_parameter_has_a_named_part(family):
    model, recipe = meta_lvlm(family)
    parts = parameter_parts(model)
    assert "llm_other" not in parts.values()
    names = get_family(family)
    layers = recipe.model.num_layers
    # Every decoder layer's norms by name, plus the final norm; nothing else is a norm.
    norms = {n.rsplit(".", 1)[0] for n, part in parts.items() if part == "norms"}
    expected = {
        f"model.language_model.layers.{i}.{norm}"
        for i in range(layers)
        for norm in names.layer_norms
    } | {f"model.language_model.{names.final_norm}"}
    assert norms == expected
    attention = {n.split(".")[4] for n, part in parts.items() if part == "attention"}
    assert attention == {names.attention}
    assert {n for n, part in parts.items() if part == "embeddings"} == {
        "model.language_model.embed_tokens.weight"
    }


def test_golden_part_sizes_of_tiny_llama():
    # 4 layers: q, k, v, o (4 each), gate/up/down (3 each), 2 RMSNorms each + the final norm.
    model, _ = meta_lvlm("llama")
    counts = Counter(parameter_parts(model).values())
    assert counts["attention"] == 16 and counts["ffn"] == 12 and counts["norms"] == 9
    assert counts["embeddings"] == 1 and counts["lm_head"] == 1 and counts["projector"] == 4


def test_layer_children_by_exact_name_not_by_class_name():
    phi = get_family("phi")
    assert layer_child_part("mlp", phi) == "ffn"
    assert layer_child_part("input_layernorm", phi) == "norms"
    # Phi has one norm per layer; a module merely named like a norm elsewhere is not one.
    assert layer_child_part("post_attention_layernorm", phi) == "other"
    assert layer_child_part("self_attn", phi) == "attention"
    assert layer_child_part("resid_dropout", phi) == "other"


def test_set_trainable_freezes_everything_else():
    recipe = load_recipe(recipes_root() / "tiny/qwen2.toml")
    model, _ = build_random_lvlm(recipe)
    names = set_trainable(model, ["projector", "norms"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert trainable and all(".multi_modal_projector." in n or "norm" in n for n in trainable)
    assert not any("vision_tower" in n or "self_attn." in n for n in trainable)
    # "llm" is the whole language model, head and embeddings included; nothing of the tower.
    llm = set(set_trainable(model, ["llm"]))
    assert "lm_head.weight" in llm and "model.language_model.embed_tokens.weight" in llm
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in llm)
    assert len(llm) == sum(1 for n, _ in model.named_parameters() if "language_model" in n) + 1
