"""The sparse LVLM: exactness after upcycling across families, save/load, generate, losses."""

import warnings

import pytest
import torch

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.models import modeling_moe_llava as modeling
from moetool.models.build import save_checkpoint
from moetool.models.modeling_moe_llava import decoder_layers
from moetool.models.moe import router_losses
from moetool.models.moe.config import MoEConfig
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm
from moetool.train.engine import enable_activation_checkpointing
from moetool.upcycle import upcycle_checkpoint

FAMILIES = ["phi", "stablelm", "qwen2", "llama", "mistral", "qwen3", "gemma2"]


def make_inputs(config, batch=2, seq=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, config.text_config.vocab_size, (batch, seq), generator=g)
    image_tokens = config.image_seq_length
    ids[:, 1 : 1 + image_tokens] = config.image_token_id
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second sample
    return ids, pixels, mask


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    paths = {}
    for family in FAMILIES:
        model, processor = build_random_lvlm(
            load_recipe(recipes_root() / f"tiny/{family}.toml"), seed=1
        )
        save_checkpoint(model, processor, root / family)
        paths[family] = root / family
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_model_is_exact_through_from_pretrained(family, dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    src = dense_checkpoints[family]
    upcycle_checkpoint(src, tmp_path / "sparse", MoEConfig(router_std=1.0))
    dense = LlavaForConditionalGeneration.from_pretrained(src).eval()
    sparse = AutoModelForImageTextToText.from_pretrained(tmp_path / "sparse").eval()
    assert type(sparse).__name__ == "MoELlavaForConditionalGeneration"
    assert sparse.moe_layer_indices() == [0, 2]
    ids, pixels, mask = make_inputs(dense.config)
    with torch.no_grad():
        expected = dense(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        out = sparse(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert (out.logits - expected).abs().max().item() <= 1e-4
    # The routers are far from uniform (std 1.0), so exactness is not an accident of routing.
    assert out.aux_loss.item() > 2.0 * 1.0
    kwargs = dict(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
    )
    assert torch.equal(dense.generate(**kwargs), sparse.generate(**kwargs))


def assert_same_output_value(ours, theirs, key):
    """Recursive equality of an output field: tensors within 1e-4, containers element-wise,
    anything else (a cache object) of the same type."""
    from transformers.utils import ModelOutput

    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), key
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=key)
    elif isinstance(theirs, ModelOutput):
        assert list(ours.keys()) == list(theirs.keys()), key
        for name in theirs:
            assert_same_output_value(ours[name], theirs[name], f"{key}.{name}")
    elif isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs), key
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_output_value(a, b, f"{key}[{i}]")
    else:
        assert type(ours) is type(theirs), key


def test_output_holds_every_field_of_the_installed_llava_output(dense_checkpoints, tmp_path):
    """Upstream assumption named: the sparse output is the installed transformers' LLaVA output
    plus moetool's losses, whatever fields that release has (5.24 renamed two of them; copying
    fields by name broke every forward)."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

    src = dense_checkpoints["llama"]
    upcycle_checkpoint(src, tmp_path / "sparse", MoEConfig(router_std=1.0))
    dense = LlavaForConditionalGeneration.from_pretrained(src).eval()
    sparse = AutoModelForImageTextToText.from_pretrained(tmp_path / "sparse").eval()
    ids, pixels, mask = make_inputs(dense.config)
    kwargs = dict(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        labels=ids,
        use_cache=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    with torch.no_grad():
        expected = dense(**kwargs)
        out = sparse(**kwargs)
        as_tuple = sparse(**kwargs, return_dict=False)
    assert isinstance(out, LlavaCausalLMOutputWithPast)
    theirs = [k for k in expected if k != "loss"]
    assert len(theirs) >= 5  # logits, cache, hidden states, attentions, image outputs
    assert [k for k in out if k in theirs] == theirs
    for key in theirs:
        assert_same_output_value(out[key], expected[key], key)
    assert {"lm_loss", "aux_loss", "z_loss"} <= set(out.keys())
    torch.testing.assert_close(out.lm_loss, expected.loss)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(out.keys())
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_routers_of_a_new_sparse_model_are_initialised_like_the_model(dense_checkpoints):
    """Upstream assumption named: transformers' _init_weights initialises the routers that the
    sparse model's constructor adds (normal, std = initializer_range)."""
    from transformers import AutoConfig

    from moetool.models.configuration_moe_llava import MoELlavaConfig
    from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration

    dense = AutoConfig.from_pretrained(dense_checkpoints["qwen2"]).to_dict()
    dense.pop("model_type")
    config = MoELlavaConfig(**dense, moe={"num_experts": 4, "top_k": 2, "layers": [0, 2]})
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(config)
    std = config.text_config.initializer_range
    routers = torch.cat([b.router.weight.flatten() for b in model.moe_blocks()])
    assert routers.numel() >= 256
    assert 0.8 * std < routers.std().item() < 1.2 * std
    assert abs(routers.mean().item()) < 0.2 * std


def test_raw_weights_option_changes_the_output(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    src = dense_checkpoints["llama"]
    upcycle_checkpoint(src, tmp_path / "raw", MoEConfig(normalize_top_k=False, router_std=1.0))
    dense = LlavaForConditionalGeneration.from_pretrained(src).eval()
    sparse = AutoModelForImageTextToText.from_pretrained(tmp_path / "raw").eval()
    ids, pixels, mask = make_inputs(dense.config)
    with torch.no_grad():
        diff = (
            (
                sparse(input_ids=ids, pixel_values=pixels).logits
                - dense(input_ids=ids, pixel_values=pixels).logits
            )
            .abs()
            .max()
        )
    assert diff > 1e-3  # raw Eq. 6 weights sum to < 1: not exact, as documented


def test_loss_is_lm_plus_alpha_aux_and_save_load_round_trip(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(
        dense_checkpoints["qwen2"],
        tmp_path / "s",
        MoEConfig(aux_loss_coef=0.5, router_std=1.0),
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    ids, pixels, mask = make_inputs(model.config)
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    assert out.aux_loss.item() >= 2 * 1.0 - 1e-4  # >= 1 per layer, 2 layers
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    assert again.config.moe == model.config.moe
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, pixel_values=pixels).logits,
            model(input_ids=ids, pixel_values=pixels).logits,
        )


def test_router_losses_are_left_out_of_decoding_only(dense_checkpoints, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(dense_checkpoints["llama"], tmp_path / "s", MoEConfig(router_std=1.0))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    ids, pixels, mask = make_inputs(model.config)
    kwargs = dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    with torch.no_grad():
        full = model(**kwargs)
        bare = model(**kwargs, router_losses=False)
        labelled = model(**kwargs, labels=ids, router_losses=False)
    assert full.aux_loss is not None and full.z_loss is not None
    assert bare.aux_loss is None and bare.z_loss is None
    assert torch.equal(bare.logits, full.logits)
    torch.testing.assert_close(labelled.aux_loss, full.aux_loss)  # training always has them
    generate = dict(kwargs, max_new_tokens=4, do_sample=False)
    calls = []
    real = modeling.compute_router_losses
    monkeypatch.setattr(modeling, "compute_router_losses", lambda *a: calls.append(1) or real(*a))
    tokens = model.generate(**generate)
    assert calls == []  # decoding computes no router loss
    assert torch.equal(model.generate(**generate, router_losses=True), tokens)
    assert len(calls) == 4  # one per decoding step when asked


def test_router_logits_are_returned_per_moe_layer(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(dense_checkpoints["phi"], tmp_path / "s", MoEConfig(num_experts=3))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    ids, pixels, mask = make_inputs(model.config)
    with torch.no_grad():
        out = model(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, output_router_logits=True
        )
        plain = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert plain.router_logits is None
    assert len(out.router_logits) == 2
    assert all(t.shape == (ids.numel(), 3) for t in out.router_logits)
    # The losses are computed from exactly these logits, padding left out.
    aux, z = router_losses(out.router_logits, mask.reshape(-1).bool())
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)
    unmasked, _ = router_losses(out.router_logits)
    assert not torch.allclose(unmasked, aux)  # the padding in make_inputs counts otherwise
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask[:1])


def test_loading_needs_no_deepspeed(dense_checkpoints, tmp_path):
    import subprocess
    import sys

    upcycle_checkpoint(dense_checkpoints["llama"], tmp_path / "s", MoEConfig())
    code = (
        "import sys, moetool, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(tmp_path / 's')!r})\n"
        "print(type(m).__name__, 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["MoELlavaForConditionalGeneration", "False"]


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_loss_and_gradients_equal_under_every_kind_of_checkpointing(
    family, dense_checkpoints, tmp_path
):
    """No checkpointing, non-reentrant and reentrant: the same loss and every gradient. The
    router losses count (alpha 0.5, z 0.1): reentrant checkpointing first runs a layer under
    no_grad, so router logits kept from inside it would train nothing."""
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(
        dense_checkpoints[family],
        tmp_path / "s",
        MoEConfig(router_std=1.0, capacity_factor=0.75, aux_loss_coef=0.5, z_loss_coef=0.1),
    )
    ids, pixels, mask = make_inputs(
        AutoModelForImageTextToText.from_pretrained(tmp_path / "s").config
    )
    results = {}
    for mode in ("off", "non-reentrant", "reentrant", "lm only"):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").train()
        if mode in ("non-reentrant", "reentrant"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecated transformers API
                enable_activation_checkpointing(model, reentrant=mode == "reentrant")
            assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids)
        (out.lm_loss if mode == "lm only" else out.loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (out.loss.detach(), grads)
    loss, grads = results["off"]
    assert any(".experts." in n for n in grads) and any("lm_head" in n for n in grads)
    for mode in ("non-reentrant", "reentrant"):
        other_loss, other = results[mode]
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=0)
        assert other.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other[name], grads[name], atol=1e-6, rtol=1e-5)
    # The router losses do move the routers: without them the gradients differ.
    lm_only = results["lm only"][1]
    routers = [n for n in grads if n.endswith("router.weight")]
    assert routers and all((lm_only[n] - grads[n]).abs().max() > 1e-4 for n in routers)


def test_automodel_builds_the_sparse_base_model_that_vllm_serves(tmp_path):
    """vLLM's Transformers backend builds ``AutoModel`` for the config and adds its own head:
    it must be the sparse model's own base (same hidden states), not a dense LLaVA."""
    from transformers import AutoModel, AutoModelForImageTextToText

    from moetool.models.modeling_moe_llava import MoELlavaModel
    from moetool.models.moe import MoEBlock

    recipe = load_recipe(recipes_root() / "tiny/phi.toml")
    dense, processor = build_random_lvlm(recipe, seed=4)
    save_checkpoint(dense, processor, tmp_path / "dense")
    moe = MoEConfig(num_experts=4, top_k=2, drop_upcycling=0.5)
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "sparse", moe, seed=1)
    base = AutoModel.from_pretrained(tmp_path / "sparse").eval()
    full = AutoModelForImageTextToText.from_pretrained(tmp_path / "sparse").eval()
    assert isinstance(base, MoELlavaModel)
    assert sum(isinstance(m, MoEBlock) for m in base.modules()) == len(full.moe_blocks()) > 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        hidden = base(input_ids=ids).last_hidden_state
        expected = full.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
