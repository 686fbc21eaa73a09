"""`moetool convert --from moe-llava`: synthetic checkpoints in the official MoE-LLaVA layout
(Phi, StableLM, Qwen-1, Mistral and the other backbones, tiny dims), converted, loaded with
``from_pretrained`` and checked against a reference forward written here from the official
equations (the official decoder blocks and DeepSpeed's top-2 gate)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.convert import (
    BACKBONES,
    ConvertError,
    ConvertOptions,
    convert_checkpoint,
    get_backbone,
    map_official_name,
    moe_section_from_official,
    vision_config_for,
)

HIDDEN, HEADS, LAYERS, FFN, EXPERTS = 32, 4, 4, 48, 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 64  # model rows; the tokenizer has fewer, as the real bases do
MOE_LAYERS = [0, 2]
VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}
TOWER_PREFIX = "image_tower.image_tower.vision_model."

VARIANTS = {
    "phi": {
        "model_type": "moe_llava_phi",
        "hidden_act": "gelu_new",
        "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.5,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "num_key_value_heads": HEADS,
    },
    "stablelm": {
        "model_type": "moe_llava_stablelm",
        "hidden_act": "silu",
        "norm_eps": 1e-5,
        "rope_pct": 0.25,
        "use_qkv_bias": True,
        "num_key_value_heads": HEADS,
    },
    "qwen": {
        "model_type": "moe_llava_qwen",
        "intermediate_size": 2 * FFN,  # Qwen-1 counts w1 and w2 together
        "kv_channels": HEAD_DIM,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "layer_norm_epsilon": 1e-6,
        "no_bias": True,
        "seq_length": 128,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
    },
    "mistral": {
        "model_type": "moe_llava_mistral",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "num_key_value_heads": 2,
        "sliding_window": 4096,
    },
    "llama": {
        "model_type": "moe_llava_llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "num_key_value_heads": 2,
    },
    "qwen1_5": {
        "model_type": "moe_llava_qwen1_5",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "num_key_value_heads": HEADS,
    },
}
GATED = ("gate_proj", "up_proj", "down_proj")


def official_config(variant: str, **moe_overrides) -> dict:
    moe = {
        "moe_enable": True,
        "moe_mode": "sparse",
        "moe_layers_idx": MOE_LAYERS,
        "ep_size": 1,
        "num_experts": [EXPERTS] * len(MOE_LAYERS),
        "top_k_experts": 2,
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
        "use_residual": False,
        "router_aux_loss_coef": 0.01,
        "train_modules": ["wg"],
    }
    moe.update(moe_overrides)
    return {
        "architectures": ["OfficialMoELLaVA"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "mm_image_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        **VARIANTS[variant],
        "moe": moe,
    }


def _mlp_shapes(variant: str) -> dict:
    if variant == "phi":
        return {
            "fc1.weight": (FFN, HIDDEN),
            "fc1.bias": (FFN,),
            "fc2.weight": (HIDDEN, FFN),
            "fc2.bias": (HIDDEN,),
        }
    if variant == "qwen":
        return {
            "w1.weight": (FFN, HIDDEN),
            "w2.weight": (FFN, HIDDEN),
            "c_proj.weight": (HIDDEN, FFN),
        }
    return {
        "gate_proj.weight": (FFN, HIDDEN),
        "up_proj.weight": (FFN, HIDDEN),
        "down_proj.weight": (HIDDEN, FFN),
    }


def official_shapes(variant: str, config: dict) -> dict:
    """Every tensor of the official checkpoint (language model and projector), by name."""
    kv = config.get("num_key_value_heads", HEADS) * HEAD_DIM
    shapes: dict = {}
    qwen = variant == "qwen"
    p = "transformer" if qwen else "model"
    shapes[f"{p}.wte.weight" if qwen else "model.embed_tokens.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        layer = f"transformer.h.{i}." if qwen else f"model.layers.{i}."
        if qwen:
            shapes[layer + "ln_1.weight"] = (HIDDEN,)
            shapes[layer + "attn.c_attn.weight"] = (3 * HIDDEN, HIDDEN)
            shapes[layer + "attn.c_attn.bias"] = (3 * HIDDEN,)
            shapes[layer + "attn.c_proj.weight"] = (HIDDEN, HIDDEN)
            shapes[layer + "ln_2.weight"] = (HIDDEN,)
        else:
            norms = ["input_layernorm"] + ([] if variant == "phi" else ["post_attention_layernorm"])
            for norm in norms:
                shapes[layer + norm + ".weight"] = (HIDDEN,)
                if variant in ("phi", "stablelm"):
                    shapes[layer + norm + ".bias"] = (HIDDEN,)
            for proj, rows in (("q_proj", HIDDEN), ("k_proj", kv), ("v_proj", kv)):
                shapes[layer + f"self_attn.{proj}.weight"] = (rows, HIDDEN)
                if variant in ("phi", "stablelm", "qwen1_5"):
                    shapes[layer + f"self_attn.{proj}.bias"] = (rows,)
            out = "dense" if variant == "phi" else "o_proj"
            shapes[layer + f"self_attn.{out}.weight"] = (HIDDEN, HIDDEN)
            if variant == "phi":
                shapes[layer + "self_attn.dense.bias"] = (HIDDEN,)
        if i in MOE_LAYERS:
            shapes[layer + "mlp.deepspeed_moe.gate.wg.weight"] = (EXPERTS, HIDDEN)
            for e in range(EXPERTS):
                for name, shape in _mlp_shapes(variant).items():
                    shapes[layer + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = (
                        shape
                    )
        else:
            for name, shape in _mlp_shapes(variant).items():
                shapes[layer + f"mlp.{name}"] = shape
    if qwen:
        shapes["transformer.ln_f.weight"] = (HIDDEN,)
    elif variant == "phi":
        shapes["model.final_layernorm.weight"] = (HIDDEN,)
        shapes["model.final_layernorm.bias"] = (HIDDEN,)
    else:
        shapes["model.norm.weight"] = (HIDDEN,)
        if variant == "stablelm":
            shapes["model.norm.bias"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    shapes[f"{p}.mm_projector.image_spatial_proj.0.weight"] = (HIDDEN, VISION["hidden_size"])
    shapes[f"{p}.mm_projector.image_spatial_proj.0.bias"] = (HIDDEN,)
    shapes[f"{p}.mm_projector.image_spatial_proj.2.weight"] = (HIDDEN, HIDDEN)
    shapes[f"{p}.mm_projector.image_spatial_proj.2.bias"] = (HIDDEN,)
    return shapes


def official_state_dict(variant: str, config: dict, seed: int = 0) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_shapes(variant, config).items():
        if name.endswith("norm.weight") or "ln_" in name or "layernorm.weight" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("gate.wg.weight"):
            sd[name] = torch.randn(shape, generator=g)  # far from uniform routing
        else:
            sd[name] = 0.2 * torch.randn(shape, generator=g)
    torch.manual_seed(seed)
    tower = CLIPVisionModel(
        CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})
    )
    prefix = ("transformer." if variant == "qwen" else "model.") + TOWER_PREFIX
    for name, tensor in tower.state_dict().items():
        sd[prefix + name.removeprefix("vision_model.")] = tensor.clone()
    return sd


def word_tokenizer(extra=()):
    """A small tokenizer without ``<image>``, as the official bases' tokenizers are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>", "</s>", "<|end_of_turn|>", *extra]
    words += ["a", "chat", "user", "assistant", "USER", "ASSISTANT", "is", "there", "red", "yes"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>"
    )


def write_official(
    path: Path, variant: str, sd: dict, config: dict, fmt="safetensors", tokenizer=None
):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (tokenizer or word_tokenizer()).save_pretrained(path)
    if fmt == "safetensors":
        save_file(sd, path / "model.safetensors")
    elif fmt == "sharded":
        names = list(sd)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            file = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({n: sd[n] for n in part}, path / file)
            weight_map.update(dict.fromkeys(part, file))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    vision = path.parent / "vision-config.json"
    vision.write_text(json.dumps(VISION))
    return path


def official_checkpoint(root: Path, variant: str, fmt="safetensors", seed=0, **moe_overrides):
    config = official_config(variant, **moe_overrides)
    sd = official_state_dict(variant, config, seed)
    return write_official(root / f"{variant}-{fmt}", variant, sd, config, fmt), sd, config


# ---------------------------------------------------------------------------------------------
# The reference forward, from the official equations
# ---------------------------------------------------------------------------------------------


def rotate(x, positions, rotary_dims, base):
    """GPT-NeoX rotary embedding on the first ``rotary_dims`` dims of each head (rotate_half)."""
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    half = rotary_dims // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def attention(q, k, v, rotary_dims, base):
    b, t, _ = q.shape
    q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
    kv_heads = k.shape[-1] // HEAD_DIM
    k = k.view(b, t, kv_heads, HEAD_DIM).transpose(1, 2)
    v = v.view(b, t, kv_heads, HEAD_DIM).transpose(1, 2)
    positions = torch.arange(t)
    q, k = rotate(q, positions, rotary_dims, base), rotate(k, positions, rotary_dims, base)
    k = k.repeat_interleave(HEADS // kv_heads, dim=1)
    v = v.repeat_interleave(HEADS // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).reshape(b, t, -1)


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def mlp(variant, sd, prefix, x):
    def lin(name):
        return F.linear(x, sd[prefix + name + ".weight"], sd.get(prefix + name + ".bias"))

    if variant == "phi":
        h = gelu_new(lin("fc1"))
        return F.linear(h, sd[prefix + "fc2.weight"], sd[prefix + "fc2.bias"])
    if variant == "qwen":  # Qwen-1: c_proj(w1(x) * silu(w2(x)))
        return F.linear(lin("w1") * F.silu(lin("w2")), sd[prefix + "c_proj.weight"])
    return F.linear(F.silu(lin("gate_proj")) * lin("up_proj"), sd[prefix + "down_proj.weight"])


def deepspeed_top2(variant, sd, prefix, x, capacity_factor, min_capacity):
    """DeepSpeed's top-2 gate (sharded_moe.top2gating) without the Gumbel noise on the second
    choice: capacity by token order, first choices before second ones, weights renormalised
    over the kept assignments."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits = x.float() @ sd[prefix + "deepspeed_moe.gate.wg.weight"].float().t()
    gates = torch.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    mask1 = F.one_hot(gates.argmax(1), num_experts)
    mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(1), num_experts)
    locations1 = mask1.cumsum(0) - 1
    locations2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
    capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * 2), min_capacity)
    mask1 = mask1 * (locations1 < capacity)
    mask2 = mask2 * (locations2 < capacity)
    gates1, gates2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    denom = (gates1 + gates2).clamp(min=torch.finfo(gates.dtype).eps)
    combine = (gates1 / denom).unsqueeze(1) * mask1 + (gates2 / denom).unsqueeze(1) * mask2
    out = torch.zeros_like(x)
    for e in range(num_experts):
        expert = f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}."
        out += combine[:, e : e + 1].to(x.dtype) * mlp(variant, sd, expert, x)
    return out.reshape(shape)


def reference_logits(variant, sd, config, ids, pixels):
    """The official MoE-LLaVA forward: CLIP tower (hidden state -2, CLS dropped), Linear-GELU-
    Linear projector, image features spliced in at IMAGE_TOKEN_INDEX (-200), decoder, head."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    qwen = variant == "qwen"
    p = "transformer." if qwen else "model."
    tower = CLIPVisionModel(
        CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})
    )
    tower.load_state_dict(
        {k[len(p + TOWER_PREFIX) :]: v for k, v in sd.items() if k.startswith(p + TOWER_PREFIX)}
    )
    hidden = tower.eval()(pixels, output_hidden_states=True).hidden_states
    features = hidden[config["mm_vision_select_layer"]][:, 1:]
    proj = p + "mm_projector.image_spatial_proj."
    features = F.linear(features, sd[proj + "0.weight"], sd[proj + "0.bias"])
    features = F.linear(F.gelu(features), sd[proj + "2.weight"], sd[proj + "2.bias"])
    embed = sd["transformer.wte.weight" if qwen else "model.embed_tokens.weight"]
    rows = []
    for b in range(ids.shape[0]):
        at = (ids[b] == -200).nonzero().item()
        rows.append(torch.cat([embed[ids[b, :at]], features[b], embed[ids[b, at + 1 :]]]))
    x = torch.stack(rows)
    moe = config["moe"]
    eps = config.get("layer_norm_eps", config.get("norm_eps", 1e-5))
    rms_eps = config.get("rms_norm_eps", config.get("layer_norm_epsilon"))
    base = config.get("rotary_emb_base", config["rope_theta"])
    rotary_dims = int(HEAD_DIM * config.get("partial_rotary_factor", config.get("rope_pct", 1.0)))

    def ffn(i, prefix, h):
        if i in moe["moe_layers_idx"]:
            return deepspeed_top2(
                variant, sd, prefix, h, moe["eval_capacity_factor"], moe["min_capacity"]
            )
        return mlp(variant, sd, prefix, h)

    def lin(name, h):
        return F.linear(h, sd[name + ".weight"], sd.get(name + ".bias"))

    for i in range(LAYERS):
        if qwen:
            layer = f"transformer.h.{i}."
            h = rms_norm(x, sd[layer + "ln_1.weight"], rms_eps)
            q, k, v = lin(layer + "attn.c_attn", h).split(HIDDEN, dim=-1)
            x = x + F.linear(attention(q, k, v, HEAD_DIM, base), sd[layer + "attn.c_proj.weight"])
            h = rms_norm(x, sd[layer + "ln_2.weight"], rms_eps)
            x = x + ffn(i, layer + "mlp.", h)
            continue
        layer = f"model.layers.{i}."
        a = layer + "self_attn."
        if variant in ("phi", "stablelm"):
            h = F.layer_norm(
                x,
                (HIDDEN,),
                sd[layer + "input_layernorm.weight"],
                sd[layer + "input_layernorm.bias"],
                eps,
            )
        else:
            h = rms_norm(x, sd[layer + "input_layernorm.weight"], rms_eps)
        attn = attention(
            lin(a + "q_proj", h), lin(a + "k_proj", h), lin(a + "v_proj", h), rotary_dims, base
        )
        if variant == "phi":  # parallel block: x + attn(ln(x)) + mlp(ln(x))
            x = x + lin(a + "dense", attn) + ffn(i, layer + "mlp.", h)
            continue
        x = x + lin(a + "o_proj", attn)
        if variant == "stablelm":
            w, bias = (
                sd[layer + "post_attention_layernorm.weight"],
                sd[layer + "post_attention_layernorm.bias"],
            )
            h = F.layer_norm(x, (HIDDEN,), w, bias, eps)
        else:
            h = rms_norm(x, sd[layer + "post_attention_layernorm.weight"], rms_eps)
        x = x + ffn(i, layer + "mlp.", h)
    if qwen:
        x = rms_norm(x, sd["transformer.ln_f.weight"], rms_eps)
    elif variant == "phi":
        x = F.layer_norm(
            x, (HIDDEN,), sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"], eps
        )
    elif variant == "stablelm":
        x = F.layer_norm(x, (HIDDEN,), sd["model.norm.weight"], sd["model.norm.bias"], eps)
    else:
        x = rms_norm(x, sd["model.norm.weight"], rms_eps)
    return x @ sd["lm_head.weight"].t()


def inputs(config, image_token_id, image_tokens, seed=0, batch=2, text=12):
    """Official input ids (one -200 per sample) and ours (the image token repeated)."""
    g = torch.Generator().manual_seed(seed)
    official = torch.randint(4, image_token_id, (batch, text), generator=g)  # text tokens only
    official[:, 2] = -200
    ours = torch.cat(
        [official[:, :2], torch.full((batch, image_tokens), image_token_id), official[:, 3:]], 1
    )
    pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return official, ours, pixels


def converted_logits(out, ids, pixels):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        return model, model(input_ids=ids, pixel_values=pixels).logits


def load_all(path: Path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

FORMATS = {"phi": "safetensors", "stablelm": "bin", "qwen": "sharded", "mistral": "safetensors"}


@pytest.mark.parametrize("variant", ["phi", "stablelm", "qwen", "mistral", "llama", "qwen1_5"])
def test_converted_model_matches_the_official_equations(variant, tmp_path):
    from transformers import AutoModelForImageTextToText

    src, sd, config = official_checkpoint(tmp_path, variant, FORMATS.get(variant, "safetensors"))
    result = convert_checkpoint(
        src, tmp_path / "out", ConvertOptions(vision_config=src.parent / "vision-config.json")
    )
    out = tmp_path / "out"
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(model).__name__ == "MoELlavaForConditionalGeneration"
    assert model.moe_layer_indices() == MOE_LAYERS
    assert model.config.text_config.model_type == get_backbone(config["model_type"]).text_model_type
    image_tokens = model.config.image_seq_length
    assert image_tokens == (VISION["image_size"] // VISION["patch_size"]) ** 2
    official_ids, ids, pixels = inputs(config, model.config.image_token_id, image_tokens)
    with torch.no_grad():
        expected = reference_logits(variant, sd, config, official_ids, pixels)
        got = model.eval()(input_ids=ids, pixel_values=pixels).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    # The routers are far from uniform, so two experts per token really differ.
    assert model(input_ids=ids, pixel_values=pixels).aux_loss.item() > len(MOE_LAYERS) * 1.05
    assert result.summary()["dropped"] == []
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("variant", ["phi", "qwen"])
def test_every_source_tensor_lands_exactly_once(variant, tmp_path):
    src, sd, _ = official_checkpoint(tmp_path, variant)
    result = convert_checkpoint(
        src, tmp_path / "out", ConvertOptions(vision_config=src.parent / "vision-config.json")
    )
    out = load_all(tmp_path / "out")
    assert set(out) == {t.name for t in result.plan.tensors}
    pieces: dict[str, list] = {}
    for spec in result.plan.tensors:
        pieces.setdefault(spec.source, []).append(spec)
    assert set(pieces) == set(sd)  # every source tensor is used
    for source, specs in pieces.items():
        if len(specs) == 1:
            assert specs[0].rows is None
            assert torch.equal(out[specs[0].name], sd[source]), source
        else:  # Qwen-1's fused c_attn: q, k, v, in order, covering every row once
            assert variant == "qwen" and source.endswith(("c_attn.weight", "c_attn.bias"))
            assert [s.name.split(".")[-2] for s in specs] == ["q_proj", "k_proj", "v_proj"]
            assert torch.equal(torch.cat([out[s.name] for s in specs]), sd[source])
    experts = [t for t in result.plan.tensors if t.kind == "expert"]
    assert {(t.layer, t.expert) for t in experts} == {
        (i, e) for i in MOE_LAYERS for e in range(EXPERTS)
    }


def test_qwen1_gate_is_w2_and_up_is_w1(tmp_path):
    qwen = get_backbone("moe_llava_qwen")
    expert = "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.3."
    assert map_official_name(expert + "w2.weight", qwen).targets == (
        "language_model.model.layers.2.mlp.experts.3.gate_proj.weight",
    )
    assert map_official_name(expert + "w1.weight", qwen).targets == (
        "language_model.model.layers.2.mlp.experts.3.up_proj.weight",
    )
    assert map_official_name("transformer.h.1.mlp.c_proj.weight", qwen).targets == (
        "language_model.model.layers.1.mlp.down_proj.weight",
    )
    assert map_official_name("transformer.h.1.attn.c_attn.bias", qwen).kind == "split"
    phi = get_backbone("moe_llava_phi")
    assert map_official_name(
        "model.image_tower.image_tower.vision_model.post_layernorm.weight", phi
    ).targets == ("vision_tower.post_layernorm.weight",)
    assert map_official_name("model.mm_projector.0.bias", phi).targets == (
        "multi_modal_projector.linear_1.bias",
    )
    assert map_official_name("model.layers.0.mlp.coefficient.weight", phi).kind == "unknown"


def test_unknown_tensors_stop_the_conversion_and_nothing_is_written(tmp_path):
    config = official_config("mistral")
    sd = official_state_dict("mistral", config)
    sd["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    sd["model.vision_resampler.weight"] = torch.zeros(2)
    src = write_official(tmp_path / "src", "mistral", sd, config)
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(
            src, tmp_path / "out", ConvertOptions(vision_config=tmp_path / "vision-config.json")
        )
    message = str(err.value)
    assert "unknown tensors (2)" in message
    assert (
        "model.layers.1.mlp.extra_proj.weight" in message
        and "model.vision_resampler.weight" in message
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_missing_experts_are_listed_and_nothing_is_written(tmp_path):
    config = official_config("phi")
    sd = official_state_dict("phi", config)
    for name in [n for n in sd if ".deepspeed_experts.3." in n and "layers.2." in n]:
        del sd[name]
    del sd["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"]
    src = write_official(tmp_path / "src", "phi", sd, config, fmt="bin")
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(
            src, tmp_path / "out", ConvertOptions(vision_config=tmp_path / "vision-config.json")
        )
    message = str(err.value)
    assert "layer 2: expert(s) [3] of 4 missing" in message
    assert "layer 0: router" in message
    assert "language_model.model.layers.2.mlp.experts.3.fc1.weight" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_residual_moe_and_other_unsupported_configs_are_refused(tmp_path):
    src, _, _ = official_checkpoint(tmp_path, "phi", use_residual=True)
    with pytest.raises(ConvertError, match="use_residual"):
        convert_checkpoint(
            src, tmp_path / "out", ConvertOptions(vision_config=tmp_path / "vision-config.json")
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match="differs between layers"):
        moe_section_from_official({"num_experts": [4, 8], "moe_layers_idx": [0, 2]}, 4)
    with pytest.raises(ConvertError, match="unknown moe key"):
        moe_section_from_official({"expert_choice": True}, 4)
    with pytest.raises(ConvertError, match="not a MoE-LLaVA model"):
        get_backbone("llava_phi")


def test_lm_head_bias_is_refused_unless_dropped(tmp_path):
    config = official_config("phi")
    sd = official_state_dict("phi", config)
    sd["lm_head.bias"] = torch.randn(VOCAB)
    src = write_official(tmp_path / "src", "phi", sd, config)
    vision = tmp_path / "vision-config.json"
    with pytest.raises(ConvertError, match="--drop-lm-head-bias"):
        convert_checkpoint(src, tmp_path / "out", ConvertOptions(vision_config=vision))
    result = convert_checkpoint(
        src, tmp_path / "out", ConvertOptions(vision_config=vision, drop_lm_head_bias=True)
    )
    assert result.summary()["dropped"] == ["lm_head.bias"]
    saved = json.loads((tmp_path / "out/config.json").read_text())
    assert saved["moetool"]["convert"]["dropped"] == ["lm_head.bias"]


def test_routing_is_dropless_by_default_and_keeps_capacity_on_request(tmp_path):
    official = official_config("phi")["moe"]
    default = moe_section_from_official(official, LAYERS)
    assert default.eval_capacity_factor == 0.0 and default.capacity_factor == 0.0
    assert list(default.layers) == MOE_LAYERS and default.num_experts == EXPERTS
    assert default.top_k == 2 and default.normalize_top_k is True
    kept = moe_section_from_official(official, LAYERS, keep_capacity=True)
    assert (kept.capacity_factor, kept.eval_capacity_factor, kept.min_capacity) == (
        1.5,
        2.0,
        0,
    )
    top1 = moe_section_from_official({**official, "top_k_experts": 1}, LAYERS)
    assert top1.normalize_top_k is False  # DeepSpeed's top-1 weight is the raw probability
    modes = {"moe_layers_idx": None, "num_experts": [4]}
    assert moe_section_from_official({**modes, "moe_mode": "second_half"}, 6).layers == (3, 4, 5)
    assert moe_section_from_official({**modes, "moe_mode": "sparse"}, 6).layers == (0, 2, 4)


def test_dropping_official_capacity_differs_only_when_capacity_binds(tmp_path):
    """With a capacity that binds, DeepSpeed drops assignments; the dropless conversion equals
    the reference with an unbounded capacity instead."""
    src, sd, config = official_checkpoint(tmp_path, "mistral", eval_capacity_factor=0.25)
    convert_checkpoint(
        src, tmp_path / "out", ConvertOptions(vision_config=src.parent / "vision-config.json")
    )
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    official_ids, ids, pixels = inputs(
        config, model.config.image_token_id, model.config.image_seq_length
    )
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
        dropping = reference_logits("mistral", sd, config, official_ids, pixels)
        unbounded = {**config, "moe": {**config["moe"], "eval_capacity_factor": 100.0}}
        dropless = reference_logits("mistral", sd, unbounded, official_ids, pixels)
    assert (got - dropless).abs().max().item() <= 1e-4
    assert (got - dropping).abs().max().item() > 1e-3


def test_image_token_grows_a_full_vocabulary_and_the_tokenizer_gets_a_template(tmp_path):
    from transformers import AutoProcessor

    config = official_config("mistral")
    tokenizer = word_tokenizer()
    sd = official_state_dict("mistral", config)
    vocab = len(tokenizer)  # no spare row for <image>, as OpenChat-3.5's 32002
    config["vocab_size"] = vocab
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:vocab].clone()
    sd["lm_head.weight"] = sd["lm_head.weight"][:vocab].clone()
    src = write_official(tmp_path / "src", "mistral", sd, config, tokenizer=tokenizer)
    result = convert_checkpoint(
        src, tmp_path / "out", ConvertOptions(vision_config=tmp_path / "vision-config.json")
    )
    assert result.vocab_padded == (vocab, vocab + 1) and result.template == "openchat"
    out = load_all(tmp_path / "out")
    head = out["language_model.lm_head.weight"]
    assert head.shape == (vocab + 1, HIDDEN) and torch.equal(head[:vocab], sd["lm_head.weight"])
    assert not head[vocab:].any()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == vocab
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nis there"}], tokenize=False
    )
    assert prompt.endswith("USER: <image>\nis there ASSISTANT: ")
    parts = [{"type": "image"}, {"type": "text", "text": "is there"}]  # as pipelines write it
    assert processor.apply_chat_template([{"role": "user", "content": parts}]) == prompt
    batch = processor(text=prompt, images=torch.zeros(3, 28, 28), return_tensors="pt")
    assert (batch["input_ids"] == vocab).sum().item() == 4  # one per patch, CLS dropped
    model, logits = converted_logits(tmp_path / "out", batch["input_ids"], batch["pixel_values"])
    assert logits.shape[-1] == vocab + 1
    generation = json.loads((tmp_path / "out/generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|end_of_turn|>")


def test_vision_config_from_the_tower_preset():
    clip = vision_config_for(
        {"mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024}
    )
    assert (clip.model_type, clip.hidden_size, clip.num_hidden_layers, clip.image_size) == (
        "clip_vision_model",
        1024,
        24,
        336,
    )
    siglip = vision_config_for({"mm_image_tower": "google/siglip-so400m-patch14-384"})
    assert (siglip.model_type, siglip.hidden_size, siglip.image_size) == (
        "siglip_vision_model",
        1152,
        384,
    )
    with pytest.raises(ConvertError, match="--vision-config"):
        vision_config_for({"mm_image_tower": "laion/CLIP-ViT-H-14"})
    with pytest.raises(ConvertError, match="mm_hidden_size 768"):
        vision_config_for(
            {"mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 768}
        )


def test_unreadable_vision_config_names_the_file(tmp_path):
    official = {"mm_image_tower": "openai/clip-vit-large-patch14-336"}
    with pytest.raises(ConvertError, match="--vision-config: no such file"):
        vision_config_for(official, tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConvertError, match="broken.json: not valid JSON"):
        vision_config_for(official, broken)
    listed = tmp_path / "vision"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(ConvertError, match=r"vision/config.json: not a JSON object"):
        vision_config_for(official, listed)


def test_bad_sources_give_one_clear_error(tmp_path):
    options = ConvertOptions(vision_config=tmp_path / "vision-config.json")
    with pytest.raises(ConvertError, match="no such checkpoint directory"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out", options)
    src, _, _ = official_checkpoint(tmp_path, "phi")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConvertError, match="model.safetensors: not a safetensors file"):
        convert_checkpoint(src, tmp_path / "out", options)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: cannot be read with torch.load"):
        convert_checkpoint(src, tmp_path / "out", options)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_checkpoint(src, tmp_path / "out", options)
    with pytest.raises(ConvertError, match="--from"):
        convert_checkpoint(src, tmp_path / "out2", options, source_format="llava")


def test_every_backbone_has_a_test_variant():
    assert {c["model_type"] for c in VARIANTS.values()} == set(BACKBONES)


def test_a_vision_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    src, _, _ = official_checkpoint(tmp_path, "phi")
    wrong = tmp_path / "wrong-vision.json"
    wrong.write_text(json.dumps({**VISION, "num_hidden_layers": 3, "intermediate_size": 40}))
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(src, tmp_path / "out", ConvertOptions(vision_config=wrong))
    message = str(err.value)
    assert "vision_tower.encoder.layers.2.mlp.fc1.weight" in message  # missing
    assert "fc1.weight: shape [32, 16], but the config gives" in message
    assert not (tmp_path / "out").exists()
