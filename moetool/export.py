"""Sparse moetool checkpoint -> a plain transformers checkpoint of the same VLM whose language
model is a native MoE architecture (``qwen3_moe``, ``qwen2_moe`` or ``mixtral`` as its
``text_config``; Qwen3-VL: transformers' sparse twin ``qwen3_vl_moe``), loadable and servable
without moetool.

An upcycled model is exactly one of these when its base's attention and FFN are theirs: each
expert is the base's gated MLP, the router a bias-free linear map, top-k over the softmax with
renormalised or raw weights, no capacity limit at inference. The weights are renamed, not
changed (llama and mistral bases get the all-zero q/k/v biases of Qwen2 attention); tensors are
streamed as byte ranges like ``upcycle`` does. Where no architecture matches exactly the export
is refused with the reason. Qwen3-VL-MoE keeps each layer's experts in two fused tensors,
which are built from the expert tensors one expert at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetool._version import __version__
from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
    CheckpointTransform,
    TensorEntry,
    tensor_bytes,
)
from moetool.models.bases import VLMBase, get_base, is_sparse_model_type
from moetool.models.build import carry_training_processor, checkpoint_aspect_ratio
from moetool.models.moe.config import MoEConfig, MoEConfigError

TARGETS = ("qwen3_moe", "qwen2_moe", "mixtral")
# The bases each target reproduces exactly: the same attention (Qwen2's with zero q/k/v biases
# for llama and mistral) and the same gated SiLU-family MLP as experts.
TARGET_BASES = {
    "qwen3_moe": ("qwen3",),
    "qwen2_moe": ("qwen2", "llama", "mistral"),
    "mixtral": ("llama", "mistral"),
}
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# Text-config keys carried over unchanged from the base.
COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
)
# Bases whose VLM builds its language model from ``text_config`` with ``AutoModel``: a native MoE
# text config makes the same VLM sparse. Their tensors keep the names the sparse checkpoint has
# (the layout transformers saves the dense VLM in), but for the MoE layers' FFN. (``llava``
# does too, with its own renames for vLLM: ``_native_name``.)
VLM_ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}
_SERVED_AS_IT_IS = (
    "serve the checkpoint as it is: it loads in transformers after `import moetool` "
    "(moetool's vLLM plugin serves moetool_llava checkpoints only, so far)"
)
_OWN_TEXT_MODEL = (
    "its language model is {cls}, the VLM's own decoder class (M-RoPE over time, height and "
    "width), built whatever text_config says, and transformers has no MoE variant of it"
)
# Bases with no exact native twin, and why.
NO_NATIVE_TWIN = {
    "qwen2_vl": _OWN_TEXT_MODEL.format(cls="Qwen2VLTextModel"),
    "qwen2_5_vl": _OWN_TEXT_MODEL.format(cls="Qwen2_5_VLTextModel"),
    "gemma3": "its language model is gemma3_text, which no native MoE architecture reproduces "
    "(Gemma 4's MoE layers add routed experts beside a dense MLP, with a normalised, scaled "
    "router)",
}
QWEN3_VL_MOE = "qwen3_vl_moe"
# A language-model tensor of one decoder layer (in the saved layout ``_native_name`` reads).
_LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# An expert's tensor, after the MoE layer's ``mlp.``.
_EXPERT_KEY = re.compile(
    r"^experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None  # the moetool tensor it is a copy of; None: zeros, or ``fused``
    # Fused experts: for each expert, the moetool tensors stacked along their rows and then
    # transposed (its slice of a [num_experts, in, out] tensor).
    fused: tuple[tuple[str, ...], ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ExportPlan:
    target: str  # the text config's model_type (qwen3_vl_moe: the VLM's)
    why: str  # why this target (the simplest exact one)
    config: dict  # the VLM's config.json written
    tensors: tuple[ExportTensor, ...]


def choose_target(base: str, moe: MoEConfig, num_layers: int, requested: str = "auto") -> str:
    """The simplest native architecture that is exactly this model, or ``ExportError`` saying
    why there is none (or why ``requested`` is not one)."""
    _refuse_dropping(moe)
    every_layer = list(moe.layer_indices(num_layers)) == list(range(num_layers))
    if requested != "auto":
        if requested not in TARGETS:
            raise ExportError(f"--target {requested!r}: expected auto or one of {TARGETS}")
        if base not in TARGET_BASES[requested]:
            raise ExportError(
                f"--target {requested}: it does not reproduce a {base} base exactly (it takes "
                f"{', '.join(TARGET_BASES[requested])} bases)"
            )
        if requested == "mixtral" and not every_layer:
            raise ExportError(
                "--target mixtral: every Mixtral layer is MoE, this model's MoE layers are "
                f"{list(moe.layer_indices(num_layers))} of {num_layers}; use qwen2_moe"
            )
        if requested == "mixtral" and not moe.renormalize:
            raise ExportError(
                "--target mixtral: Mixtral renormalises the top-k weights, this model combines "
                "its experts with the raw router probabilities; use qwen2_moe (norm_topk_prob "
                "= false)"
            )
        return requested
    if base == "qwen3":
        return "qwen3_moe"
    if base in ("llama", "mistral") and every_layer and moe.renormalize:
        return "mixtral"
    if base in ("qwen2", "llama", "mistral"):
        return "qwen2_moe"
    raise ExportError(
        f"no native MoE architecture reproduces a {base} base exactly (qwen3_moe takes qwen3 "
        "bases; qwen2_moe qwen2, llama and mistral; mixtral llama and mistral): its attention "
        "or MLP has no native MoE counterpart. Serve the checkpoint as it is with moetool's vLLM "
        "plugin, or load it with moetool (docs/serving.md)"
    )


def _refuse_dropping(moe: MoEConfig) -> None:
    if moe.eval_capacity_factor > 0:
        raise ExportError(
            f"the model drops tokens at inference (moe.eval_capacity_factor = "
            f"{moe.eval_capacity_factor}); native MoE architectures never drop tokens, so their "
            "outputs would differ. Export a checkpoint with eval_capacity_factor = 0"
        )


def text_config(base: dict, moe: MoEConfig, target: str) -> dict:
    """The native text config of ``target`` for the base text config ``base``."""
    kind = base["model_type"]
    if base.get("mlp_bias"):
        raise ExportError(f"{kind} base with mlp_bias: native MoE experts have no biases")
    if kind in ("llama", "mistral") and base.get("attention_bias"):
        raise ExportError(
            f"{kind} base with attention_bias: its o_proj has a bias that "
            f"{target}'s attention does not"
        )
    if kind == "qwen3" and base.get("use_sliding_window"):
        raise ExportError("qwen3 base with use_sliding_window: qwen3_moe has no per-layer window")
    layers = base["num_hidden_layers"]
    moe_layers = list(moe.layer_indices(layers))
    out = {key: base[key] for key in COMMON_KEYS if key in base}
    out.update(
        model_type=target,
        architectures=[ARCHITECTURES[target]],
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        output_router_logits=False,
    )
    if target == "mixtral":
        window = base.get("sliding_window") if kind == "mistral" else None
        out.update(
            num_local_experts=moe.num_experts,
            intermediate_size=base["intermediate_size"],
            sliding_window=window,
            router_jitter_noise=0.0,
        )
        return out
    out.update(
        num_experts=moe.num_experts,
        intermediate_size=base["intermediate_size"],  # the dense (mlp_only) layers
        moe_intermediate_size=base["intermediate_size"],  # experts are copies of the FFN
        norm_topk_prob=moe.renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(layers) if i not in moe_layers],
    )
    if target == "qwen3_moe":
        out.update(
            attention_bias=base.get("attention_bias", False),
            use_sliding_window=False,
            sliding_window=base.get("sliding_window"),
        )
        return out
    # qwen2_moe: Qwen2 attention (q/k/v biases, zero for llama and mistral), no shared expert.
    out.update(qkv_bias=True, shared_expert_intermediate_size=0)
    if kind == "qwen2":
        for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
            if key in base:
                out[key] = base[key]
    else:
        window = base.get("sliding_window") if kind == "mistral" else None
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0,
            layer_types=["sliding_attention" if window else "full_attention"] * layers,
        )
    return out


def plan_export(config: dict, entries: dict[str, TensorEntry], target: str = "auto") -> ExportPlan:
    """What ``export_checkpoint`` writes for a sparse checkpoint's ``config`` and tensors."""
    model_type = config.get("model_type")
    if not is_sparse_model_type(model_type) or "moe" not in config:
        raise ExportError(
            f"expected a sparse moetool checkpoint (model_type 'moetool_<base>'), got model_type "
            f"{model_type!r}; upcycle a dense one first"
        )
    vlm = get_base(model_type)
    if vlm.model_type in NO_NATIVE_TWIN:
        raise ExportError(
            f"no native architecture reproduces a {vlm.model_type} model exactly: "
            f"{NO_NATIVE_TWIN[vlm.model_type]}; {_SERVED_AS_IT_IS}"
        )
    base = config["text_config"]
    layers = base["num_hidden_layers"]
    try:
        moe = MoEConfig.from_dict(config["moe"], layers)
    except MoEConfigError as err:
        raise ExportError(f"the checkpoint's moe section: {err}") from None
    if vlm.native == QWEN3_VL_MOE:
        return _plan_qwen3_vl_moe(config, entries, vlm, moe, target)
    if vlm.model_type not in VLM_ARCHITECTURES:
        raise ExportError(f"no native export is known for a {vlm.model_type} model")
    kind = base.get("model_type")
    chosen = choose_target(kind, moe, layers, target)
    text = text_config(base, moe, chosen)
    moe_layers = set(moe.layer_indices(layers))
    tensors: list[ExportTensor] = []
    dtype = None
    for name, entry in entries.items():
        if vlm.model_type == "llava":
            new = _native_name(name, chosen, moe_layers)
        else:
            new = _text_config_name(name, vlm, chosen, moe_layers)
        tensors.append(ExportTensor(new, entry.dtype, entry.shape, name))
        if vlm.layer_key.match(new) and new.endswith("self_attn.q_proj.weight"):
            dtype = entry.dtype
    if chosen == "qwen2_moe" and kind in ("llama", "mistral"):
        tensors += _zero_qkv_biases(tensors, vlm)
    if chosen == "qwen2_moe":
        hidden = base["hidden_size"]
        prefixes = {
            int(m["layer"]): m["prefix"] for t in tensors if (m := vlm.layer_key.match(t.name))
        }
        for i in sorted(moe_layers):  # the gate of the (empty) shared expert: its output is 0
            name = f"{prefixes[i]}{i}.mlp.shared_expert_gate.weight"
            tensors.append(ExportTensor(name, dtype or "F32", (1, hidden), None))
    why = {
        "qwen3_moe": "qwen3 base",
        "mixtral": f"{kind} base, every layer MoE, renormalised top-{moe.top_k}",
        "qwen2_moe": f"{kind} base"
        + ("" if kind == "qwen2" else ", Qwen2 attention with zero q/k/v biases")
        + (", MoE layers chosen by mlp_only_layers" if text.get("mlp_only_layers") else ""),
    }[chosen]
    if vlm.model_type != "llava":
        why = f"{vlm.model_type} with a {why}"
    native = _native_config(config, vlm.model_type, VLM_ARCHITECTURES[vlm.model_type], text, chosen)
    return ExportPlan(chosen, why, native, _sorted_unique(tensors))


def _native_config(config: dict, model_type: str, architecture: str, text: dict, target: str):
    native = {
        k: v for k, v in config.items() if k not in ("moe", "moetool", "auto_map", "text_config")
    }
    native.update(
        model_type=model_type,
        architectures=[architecture],
        text_config=text,
        moetool_export={
            "version": __version__,
            "from": config.get("moetool", {}).get("stage", "sparse"),
            "target": target,
        },
    )
    return native


def _sorted_unique(tensors: list[ExportTensor]) -> tuple[ExportTensor, ...]:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ExportError("two tensors of the checkpoint map to one name (an unexpected layout)")
    return tuple(sorted(tensors, key=lambda t: t.name))


def _plan_qwen3_vl_moe(
    config: dict, entries: dict[str, TensorEntry], vlm: VLMBase, moe: MoEConfig, target: str
) -> ExportPlan:
    """Qwen3-VL -> transformers' Qwen3-VL-MoE: the same attention, vision tower and merger
    (every other tensor keeps its name); each MoE layer's experts fused into ``gate_up_proj``
    and ``down_proj``, in the orientation the released checkpoints and vLLM use."""
    base = config["text_config"]
    layers, hidden = base["num_hidden_layers"], base["hidden_size"]
    inter = base["intermediate_size"]
    if target not in ("auto", QWEN3_VL_MOE):
        raise ExportError(f"--target {target}: a qwen3_vl model exports to {QWEN3_VL_MOE} only")
    _refuse_dropping(moe)
    if base.get("model_type") != "qwen3_vl_text":
        raise ExportError(f"a qwen3_vl model with a {base.get('model_type')} text config")
    if not moe.renormalize:
        raise ExportError(
            f"{QWEN3_VL_MOE} always renormalises the top-k weights, this model combines its "
            "experts with the raw router probabilities (top-1, or normalize_top_k = false); "
            + _SERVED_AS_IT_IS
        )
    if inter == hidden or 2 * inter == hidden:
        # transformers transposes a fused tensor on load only when its shape is not the module's
        raise ExportError(
            f"{QWEN3_VL_MOE} with intermediate_size {inter} and hidden_size {hidden}: the fused "
            "expert tensors' stored orientation cannot be told from their shape"
        )
    moe_layers = set(moe.layer_indices(layers))
    tensors: list[ExportTensor] = []
    experts: dict[str, dict[tuple[int, str], str]] = {}  # layer's mlp prefix -> its expert tensors
    for name, entry in entries.items():
        match = vlm.mlp_key.match(name)
        if match is None or int(match["layer"]) not in moe_layers:
            tensors.append(ExportTensor(name, entry.dtype, entry.shape, name))
            continue
        mlp = f"{match['prefix']}{match['layer']}.mlp"
        if match["rest"] == "router.weight":
            tensors.append(ExportTensor(f"{mlp}.gate.weight", entry.dtype, entry.shape, name))
            continue
        expert = _EXPERT_KEY.match(match["rest"])
        if expert is None:
            raise ExportError(
                f"{name}: an MoE-layer tensor {QWEN3_VL_MOE} has no place for (its experts are "
                "gate/up/down projections without biases)"
            )
        experts.setdefault(mlp, {})[int(expert["expert"]), expert["proj"]] = name
    shapes = {
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    n = moe.num_experts
    for mlp, found in experts.items():
        wanted = {(e, proj) for e in range(n) for proj in shapes}
        if set(found) != wanted:
            raise ExportError(f"{mlp}: expected the gate/up/down projections of {n} experts")
        dtypes = {entries[name].dtype for name in found.values()}
        wrong = [name for (_, proj), name in found.items() if entries[name].shape != shapes[proj]]
        if len(dtypes) != 1 or wrong:
            raise ExportError(f"{mlp}: experts of different dtypes or shapes ({wrong[:1]})")
        dtype = dtypes.pop()
        gate_up = tuple((found[e, "gate_proj"], found[e, "up_proj"]) for e in range(n))
        down = tuple((found[e, "down_proj"],) for e in range(n))
        # [experts, hidden, 2 * intermediate] (gate columns, then up) and [experts, inter, hidden]
        tensors.append(
            ExportTensor(
                f"{mlp}.experts.gate_up_proj", dtype, (n, hidden, 2 * inter), None, gate_up
            )
        )
        tensors.append(
            ExportTensor(f"{mlp}.experts.down_proj", dtype, (n, inter, hidden), None, down)
        )
    mlp_only = [i for i in range(layers) if i not in moe_layers]
    text = {
        **base,
        "model_type": "qwen3_vl_moe_text",
        "num_experts": n,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": inter,  # experts are copies of the FFN
        "intermediate_size": inter,  # the dense (mlp_only) layers
        "decoder_sparse_step": 1,
        "mlp_only_layers": mlp_only,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False,
        # Not a field of transformers' config (its model always renormalises), but vLLM's
        # Qwen3-VL-MoE reads it as Qwen3-MoE's and fails to build without it.
        "norm_topk_prob": True,
        # the text config's own default is true; the VLM's decides, and vLLM reads this one
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }
    native = _native_config(
        config, QWEN3_VL_MOE, "Qwen3VLMoeForConditionalGeneration", text, QWEN3_VL_MOE
    )
    native["vision_config"] = {**config["vision_config"], "model_type": "qwen3_vl_moe_vision"}
    why = f"qwen3_vl base, renormalised top-{moe.top_k}" + (
        ", MoE layers chosen by mlp_only_layers" if mlp_only else ""
    )
    return ExportPlan(QWEN3_VL_MOE, why, native, _sorted_unique(tensors))


def _native_name(name: str, target: str, moe_layers: set[int]) -> str:
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]  # vLLM's layout
    if name.startswith("model.language_model."):
        name = "language_model.model." + name[len("model.language_model.") :]
    elif name.startswith("model.vision_tower."):
        return _native_name(name[len("model.") :], target, moe_layers)
    elif name.startswith("model.multi_modal_projector."):
        return name[len("model.") :]
    elif name == "lm_head.weight":
        return "language_model.lm_head.weight"
    match = _LAYER_KEY.match(name)
    if not match or int(match["layer"]) not in moe_layers or not match["rest"].startswith("mlp."):
        return name
    prefix = f"language_model.model.layers.{match['layer']}"
    return _moe_ffn_name(prefix, match["rest"][len("mlp.") :], target, name)


def _text_config_name(name: str, vlm: VLMBase, target: str, moe_layers: set[int]) -> str:
    """``name`` in the same VLM with a ``target`` text config: only the MoE layers' FFN moves."""
    match = vlm.mlp_key.match(name)
    if match is None or int(match["layer"]) not in moe_layers:
        return name
    return _moe_ffn_name(f"{match['prefix']}{match['layer']}", match["rest"], target, name)


def _moe_ffn_name(prefix: str, rest: str, target: str, name: str) -> str:
    """The native name of MoE-layer tensor ``name``: ``rest`` after the layer's ``mlp.``."""
    if rest == "router.weight":
        return f"{prefix}.{'block_sparse_moe' if target == 'mixtral' else 'mlp'}.gate.weight"
    expert = _EXPERT_KEY.match(rest)
    if expert is None:
        raise ExportError(
            f"{name}: an MoE-layer tensor {target} has no place for (its experts are gate/up/"
            "down projections without biases)"
        )
    e, proj = expert["expert"], expert["proj"]
    if target == "mixtral":
        return f"{prefix}.block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERT[proj]}.weight"
    return f"{prefix}.mlp.experts.{e}.{proj}.weight"


def _zero_qkv_biases(tensors: list[ExportTensor], vlm: VLMBase) -> list[ExportTensor]:
    out = []
    for t in tensors:
        for proj in ("q_proj", "k_proj", "v_proj"):
            if vlm.layer_key.match(t.name) and t.name.endswith(f"self_attn.{proj}.weight"):
                out.append(
                    ExportTensor(t.name[: -len("weight")] + "bias", t.dtype, t.shape[:1], None)
                )
    return out


def export_checkpoint(
    src: str | Path,
    out: str | Path,
    target: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> ExportPlan:
    """Write the native export of the sparse checkpoint ``src`` to ``out`` (streamed, into a
    temporary folder renamed when complete); tokenizer, processor, chat template and generation
    config are copied."""
    with CheckpointTransform(src, out, ExportError, overwrite) as job:
        plan = plan_export(job.config, job.entries, target)

        def write_tensor(spec: ExportTensor, f) -> None:
            if spec.fused:
                import torch

                for stacked in spec.fused:  # one expert at a time
                    f.write(tensor_bytes(torch.cat([job.read_tensor(n) for n in stacked]).T))
            elif spec.source is None:
                f.write(bytes(spec.nbytes))  # zeros in every dtype
            else:
                job.copy_tensor(f, spec.source)

        # The export has no moetool block: its processor alone must shape images as trained.
        aspect_ratio = checkpoint_aspect_ratio(job.config)
        job.write(
            plan.tensors,
            write_tensor,
            plan.config,
            finish=lambda tmp: carry_training_processor(tmp, aspect_ratio),
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    return plan
