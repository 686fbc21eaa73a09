"""The sparse LVLM: exactness after upcycling across families, save/load, generate, losses."""

import warnings

import pytest
import torch

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.models.build import build_random_lvlm, save_checkpoint
from moetool.models.modeling_moe_llava import decoder_layers
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.train.runner import enable_activation_checkpointing
from moetool.upcycle import UpcycleOptions, upcycle_checkpoint

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
    upcycle_checkpoint(src, tmp_path / "sparse", UpcycleOptions(router_std=1.0))
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
    upcycle_checkpoint(src, tmp_path / "sparse", UpcycleOptions(router_std=1.0))
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
    upcycle_checkpoint(src, tmp_path / "raw", UpcycleOptions(normalize_top_k=False, router_std=1.0))
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
        UpcycleOptions(aux_loss_coef=0.5, router_std=1.0),
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


def test_router_losses_are_left_out_of_decoding_only(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(dense_checkpoints["llama"], tmp_path / "s", UpcycleOptions(router_std=1.0))
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
    tokens = model.generate(**generate)
    assert all(block.aux_loss is None for block in model.moe_blocks())
    assert torch.equal(model.generate(**generate, router_losses=True), tokens)
    assert all(block.aux_loss is not None for block in model.moe_blocks())


def test_routing_records_mark_image_tokens(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(dense_checkpoints["phi"], tmp_path / "s", UpcycleOptions())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    model.set_routing_records(True)
    ids, pixels, mask = make_inputs(model.config)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    for block in model.moe_blocks():
        rec = block.last_routing
        assert rec.expert_index.shape == (ids.numel(), 2)
        assert rec.image_mask.sum().item() == 2 * model.config.image_seq_length
        assert rec.token_mask.sum().item() == mask.sum().item()
        # Kept until the next forward, for gradient-checkpointing recomputation.
        assert torch.equal(block.token_mask, mask.bool())


def test_loading_needs_no_deepspeed(dense_checkpoints, tmp_path):
    import subprocess
    import sys

    upcycle_checkpoint(dense_checkpoints["llama"], tmp_path / "s", UpcycleOptions())
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


def test_gradient_checkpointing_gives_the_same_gradients(dense_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle_checkpoint(
        dense_checkpoints["llama"],
        tmp_path / "s",
        UpcycleOptions(router_std=1.0, capacity_factor=0.75),
    )
    ids, pixels, mask = make_inputs(
        AutoModelForImageTextToText.from_pretrained(tmp_path / "s").config
    )
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecated transformers API
                enable_activation_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads.append(
            {
                n: p.grad.clone()
                for n, p in model.named_parameters()
                if p.grad is not None and ".mlp." in n
            }
        )
    assert grads[0].keys() == grads[1].keys() and any("router" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
