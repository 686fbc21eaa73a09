"""MoEConfig: the one definition of the MoE settings, its checks and its checkpoint form."""

import dataclasses

import pytest

from moetool.models.moe.config import MoEConfig, MoEConfigError

# A `moe` config section as moetool wrote it before MoEConfig (nine keys).
OLD_SECTION = {
    "num_experts": 4,
    "top_k": 2,
    "layers": [0, 2],
    "capacity_factor": 1.5,
    "eval_capacity_factor": 0.0,
    "min_capacity": 0,
    "aux_loss_coef": 0.01,
    "z_loss_coef": 0.0,
    "normalize_top_k": True,
}


def test_round_trip_through_the_checkpoint_form():
    config = MoEConfig(num_experts=8, top_k=1, layers="second-half", balance_scope="global-batch")
    resolved = config.resolved(6)
    assert resolved.layers == (3, 4, 5) and resolved.normalize_top_k is False
    data = resolved.to_dict()
    assert data["layers"] == [3, 4, 5]
    assert set(data) == {f.name for f in dataclasses.fields(MoEConfig)}
    assert MoEConfig.from_dict(data, 6) == resolved


def test_a_section_written_by_an_older_release_loads_with_defaults():
    config = MoEConfig.from_dict(OLD_SECTION, 4)
    assert config.layers == (0, 2) and config.capacity_factor == 1.5
    assert config.balance_scope == "micro-batch" and config.router_init == "normal"


def test_combine_weights_default_by_top_k_and_renormalised_top1_is_refused():
    assert MoEConfig(top_k=2).renormalize and not MoEConfig(top_k=1).renormalize
    assert not MoEConfig(top_k=2, normalize_top_k=False).renormalize
    (problem,) = MoEConfig(top_k=1, normalize_top_k=True).problems()
    assert problem[0] == "normalize_top_k" and "no gradient" in problem[1]
    with pytest.raises(MoEConfigError, match="moe.normalize_top_k: true with top_k = 1"):
        MoEConfig.from_dict({**OLD_SECTION, "top_k": 1}, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts": 1}, "moe.num_experts: must be at least 2"),
        ({"top_k": 5}, "moe.top_k: 5 is greater than num_experts (4)"),
        ({"layers": [0, 4]}, "moe.layers: layer index [4] out of range"),
        ({"layers": [1, 1]}, "moe.layers: repeats a layer index"),
        ({"layers": "every-third"}, "moe.layers: expected one of interval"),
        ({"capacity_factor": float("nan")}, "moe.capacity_factor: must be a finite number"),
        ({"drop_upcycling": 1.0}, "moe.drop_upcycling: must be in [0, 1)"),
        ({"balance_scope": "global"}, "moe.balance_scope: must be one of micro-batch"),
        ({"router_init": "xavier"}, "moe.router_init: must be one of normal"),
        ({"top_k": "2"}, "moe.top_k: expected an integer, got '2'"),
        ({"normalize_top_k": 1}, "moe.normalize_top_k: expected a boolean"),
        ({"experts": 4}, "moe: unknown key(s) ['experts']"),
    ],
)
def test_a_wrong_section_names_its_key(change, message):
    with pytest.raises(MoEConfigError) as info:
        MoEConfig.from_dict({**OLD_SECTION, **change}, 4)
    assert message in str(info.value)


def test_the_sparse_config_checks_its_section_on_load():
    from transformers import CLIPVisionConfig, LlamaConfig

    from moetool.models.configuration_moe_llava import MoELlavaConfig

    text = LlamaConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2)
    vision = CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    config = MoELlavaConfig(text_config=text, vision_config=vision, moe={"layers": "first-half"})
    # A typed sub-config, read once: resolved in memory, plain data in the saved config.
    assert isinstance(config.moe, MoEConfig)
    assert config.moe.layers == (0, 1) and config.moe.normalize_top_k is True
    saved = config.to_dict()["moe"]
    assert saved["layers"] == [0, 1] and MoEConfig.from_dict(saved, 4) == config.moe
    assert MoELlavaConfig.from_dict(config.to_dict()).moe == config.moe
    with pytest.raises(MoEConfigError, match="out of range"):
        MoELlavaConfig(text_config=text, vision_config=vision, moe={"layers": [7]})
