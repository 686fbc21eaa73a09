"""LoRA on the sparse LVLM through peft: targets by part, routers in full, expert_init, merging
(the plain checkpoint equals the adapter model), QLoRA through bitsandbytes."""

import pytest
import torch
from test_sparse_model import make_inputs  # tests/models, on the path under pytest

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.models.build import save_checkpoint
from moetool.models.lora import (
    apply_lora,
    expert_adapters,
    merged_state_dict,
    plain_model,
    quantization_config,
    target_modules,
)
from moetool.models.moe.config import MoEConfig
from moetool.models.parts import set_trainable
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.recipe.schema import LoraSection
from moetool.tiny import build_random_lvlm
from moetool.upcycle import upcycle_checkpoint


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/qwen2.toml"), seed=3)
    save_checkpoint(model, processor, root / "dense")
    upcycle_checkpoint(root / "dense", root / "sparse", MoEConfig(router_std=1.0))
    return root / "sparse"


def load(path, lora=None):
    from transformers import AutoModelForImageTextToText

    extra = {}
    if lora is not None and lora.quantize != "none":
        extra["quantization_config"] = quantization_config(lora, torch.float32)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **extra)


def adapted(path, lora, trainable=("routers",), seed=0):
    model = load(path, lora)
    torch.manual_seed(seed)
    return apply_lora(model, lora, set_trainable(model, list(trainable)))


def test_targets_are_the_linear_layers_of_the_named_parts(sparse_checkpoint):
    model = load(sparse_checkpoint)
    experts = target_modules(model, ["experts"])
    ffn = target_modules(model, ["ffn"])
    attention = target_modules(model, ["attention"])
    # 2 MoE layers x 4 experts x 3 linears; ffn adds the 2 dense layers' 3 linears each.
    assert len(experts) == 24 and all(".mlp.experts." in n for n in experts)
    assert len(ffn) == 30 and set(experts) < set(ffn)
    assert len(attention) == 16 and all(".self_attn." in n for n in attention)
    every = target_modules(model, ["vision", "projector", "attention", "ffn", "lm_head"])
    assert not [n for n in every if n.endswith(".router")]  # routers never get adapters
    assert "lm_head" in every


def test_routers_train_in_full_in_fp32_and_the_rest_is_frozen(sparse_checkpoint):
    model = adapted(sparse_checkpoint, LoraSection(r=4, alpha=8, targets=("experts",)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    routers = [n for n in trainable if ".router." in n]
    assert len(routers) == 2 and all(trainable[n].dtype == torch.float32 for n in routers)
    assert all(".router.modules_to_save." in n for n in routers)  # full copies, not adapters
    rest = set(trainable) - set(routers)
    assert rest and all(".lora_A." in n or ".lora_B." in n for n in rest)
    assert all(".experts." in n for n in rest)


def test_the_router_gradient_from_the_lm_loss_is_that_of_full_tuning(sparse_checkpoint):
    """At the start the adapters add nothing (B = 0): the LoRA model computes the full model's
    function, so the router's gradient from the LM loss alone (aux coefficient 0) is the same
    as when the whole FFN trains (the LM loss alone: the aux loss is the same in both)."""
    lora = LoraSection(r=4, alpha=8, dropout=0.0, targets=("ffn",))
    peft_model = adapted(sparse_checkpoint, lora)
    full = load(sparse_checkpoint)
    set_trainable(full, ["ffn", "routers"])
    ids, pixels, mask = make_inputs(full.config)
    grads = []
    for model in (peft_model, full):
        model.train()
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids)
        out.lm_loss.backward()
        grads.append(
            [p.grad for n, p in model.named_parameters() if ".router." in n and p.requires_grad]
        )
    lora_grads, full_grads = grads
    assert len(lora_grads) == len(full_grads) == 2
    for a, b in zip(lora_grads, full_grads, strict=True):
        assert a.abs().sum() > 0  # the LM loss reaches the router through the combine weights
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_expert_init_independent_and_identical(sparse_checkpoint):
    def first_layer_a(model):
        experts = expert_adapters(model)[0]
        return [e["gate_proj"].lora_A["default"].weight.detach().clone() for e in experts]

    independent = first_layer_a(adapted(sparse_checkpoint, LoraSection(r=4, targets=("ffn",))))
    identical = first_layer_a(
        adapted(sparse_checkpoint, LoraSection(r=4, targets=("ffn",), expert_init="identical"))
    )
    assert len(independent) == 4
    assert all(not torch.equal(independent[0], a) for a in independent[1:])
    assert all(torch.equal(identical[0], a) for a in identical[1:])
    # Each draw depends on the seed alone: every rank builds the same adapters.
    again = first_layer_a(adapted(sparse_checkpoint, LoraSection(r=4, targets=("ffn",))))
    assert all(torch.equal(a, b) for a, b in zip(independent, again, strict=True))


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_the_merged_state_is_the_adapter_model(sparse_checkpoint, quantize):
    """Adapters made non-zero, then folded in: a plain model loaded with the merged state gives
    the adapter model's logits (fp32, 1e-4); quantized weights come out dequantized, in the
    plain model's key names, with no quantization left in the config."""
    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    lora = LoraSection(r=4, alpha=8, dropout=0.0, targets=("ffn", "attention"), quantize=quantize)
    peft_model = adapted(sparse_checkpoint, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name or ".router." in name:
                p.normal_(std=0.05)
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model, state, torch.float32, rank=0, partitioned=False)
    plain = plain_model(peft_model)
    assert "quantization_config" not in plain.config.to_dict()
    reference = load(sparse_checkpoint)  # the plain model's names and shapes
    expected_keys = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in merged.items()} == expected_keys
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float32}
    reference.load_state_dict(merged)
    ids, pixels, mask = make_inputs(reference.config)
    # Training mode without dropout: bitsandbytes' CPU inference kernel (eval mode) is not its
    # own dequantized weight (~1e-2 apart), what training computed with is.
    peft_model.train()
    reference.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = reference(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert (got - expected).abs().max() <= 1e-4
    if quantize == "none":  # the adapters matter: without them the logits differ
        with peft_model.disable_adapter(), torch.no_grad():
            base = peft_model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        assert (base - expected).abs().max() > 1e-3
