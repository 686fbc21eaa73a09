"""Sparse moetool checkpoint -> a plain transformers LLaVA checkpoint whose language model is a
native MoE architecture (``qwen3_moe``, ``qwen2_moe`` or ``mixtral``), loadable and servable
without moetool.

An upcycled model is exactly one of these when its base's attention and FFN are theirs: each
expert is the base's gated MLP, the router a bias-free linear map, top-k over the softmax with
renormalised or raw weights, no capacity limit at inference. The weights are renamed, not
changed (llama and mistral bases get the all-zero q/k/v biases of Qwen2 attention); tensors are
streamed as byte ranges like ``upcycle`` does. Where no architecture matches exactly the export
is refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetool._version import __version__
from moetool.checkpoint_io import (
    SAFETENSORS_DTYPE_BYTES,
    CheckpointError,
    SourceFiles,
    TensorEntry,
    copy_side_files,
    read_checkpoint_index,
    write_sharded_safetensors,
)
from moetool.io import UnsafeOverwriteError, atomic_output_dir
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
# A language-model tensor of one decoder layer (in the saved layout ``_native_name`` reads).
_LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None  # the moetool tensor it is a copy of; None: zeros

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ExportPlan:
    target: str  # the text config's model_type
    why: str  # why this target (the simplest exact one)
    config: dict  # the LLaVA config.json written
    tensors: tuple[ExportTensor, ...]


def choose_target(base: str, moe: MoEConfig, num_layers: int, requested: str = "auto") -> str:
    """The simplest native architecture that is exactly this model, or ``ExportError`` saying
    why there is none (or why ``requested`` is not one)."""
    if moe.eval_capacity_factor > 0:
        raise ExportError(
            f"the model drops tokens at inference (moe.eval_capacity_factor = "
            f"{moe.eval_capacity_factor}); native MoE architectures never drop tokens, so their "
            "outputs would differ. Export a checkpoint with eval_capacity_factor = 0"
        )
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
    if config.get("model_type") != "moetool_llava" or "moe" not in config:
        raise ExportError(
            f"expected a sparse moetool checkpoint (model_type 'moetool_llava'), got model_type "
            f"{config.get('model_type')!r}; upcycle a dense one first"
        )
    base = config["text_config"]
    layers = base["num_hidden_layers"]
    try:
        moe = MoEConfig.from_dict(config["moe"], layers)
    except MoEConfigError as err:
        raise ExportError(f"the checkpoint's moe section: {err}") from None
    kind = base.get("model_type")
    chosen = choose_target(kind, moe, layers, target)
    text = text_config(base, moe, chosen)
    moe_layers = set(moe.layer_indices(layers))
    tensors: list[ExportTensor] = []
    dtype = None
    for name, entry in entries.items():
        new = _native_name(name, chosen, moe_layers)
        tensors.append(ExportTensor(new, entry.dtype, entry.shape, name))
        if new.startswith("language_model.") and new.endswith("self_attn.q_proj.weight"):
            dtype = entry.dtype
    if chosen == "qwen2_moe" and kind in ("llama", "mistral"):
        tensors += _zero_qkv_biases(tensors)
    if chosen == "qwen2_moe":
        hidden = base["hidden_size"]
        for i in sorted(moe_layers):  # the gate of the (empty) shared expert: its output is 0
            name = f"language_model.model.layers.{i}.mlp.shared_expert_gate.weight"
            tensors.append(ExportTensor(name, dtype or "F32", (1, hidden), None))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ExportError("two tensors of the checkpoint map to one name (an unexpected layout)")
    llava = {
        k: v for k, v in config.items() if k not in ("moe", "moetool", "auto_map", "text_config")
    }
    llava.update(
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
        text_config=text,
        moetool_export={
            "version": __version__,
            "from": config.get("moetool", {}).get("stage", "sparse"),
            "target": chosen,
        },
    )
    why = {
        "qwen3_moe": "qwen3 base",
        "mixtral": f"{kind} base, every layer MoE, renormalised top-{moe.top_k}",
        "qwen2_moe": f"{kind} base"
        + ("" if kind == "qwen2" else ", Qwen2 attention with zero q/k/v biases")
        + (", MoE layers chosen by mlp_only_layers" if text.get("mlp_only_layers") else ""),
    }[chosen]
    return ExportPlan(chosen, why, llava, tuple(sorted(tensors, key=lambda t: t.name)))


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
    layer, rest = match["layer"], match["rest"][len("mlp.") :]
    prefix = f"language_model.model.layers.{layer}"
    if rest == "router.weight":
        return f"{prefix}.{'block_sparse_moe' if target == 'mixtral' else 'mlp'}.gate.weight"
    expert = re.match(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
    if expert is None:
        raise ExportError(
            f"{name}: an MoE-layer tensor {target} has no place for (its experts are gate/up/"
            "down projections without biases)"
        )
    e, proj = expert.groups()
    if target == "mixtral":
        return f"{prefix}.block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERT[proj]}.weight"
    return f"{prefix}.mlp.experts.{e}.{proj}.weight"


def _zero_qkv_biases(tensors: list[ExportTensor]) -> list[ExportTensor]:
    out = []
    for t in tensors:
        for proj in ("q_proj", "k_proj", "v_proj"):
            lm = t.name.startswith("language_model.")
            if lm and t.name.endswith(f"self_attn.{proj}.weight"):
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
    src, out = Path(src), Path(out)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{src}: not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
        entries = read_checkpoint_index(src)
    except (CheckpointError, ValueError) as err:
        raise ExportError(f"{src}: {err}") from None
    plan = plan_export(config, entries, target)
    sources = SourceFiles()

    def write_tensor(spec: ExportTensor, f) -> None:
        if spec.source is None:
            f.write(bytes(spec.nbytes))  # zeros in every dtype
        else:
            sources.copy(f, entries[spec.source])

    try:
        with atomic_output_dir(out, overwrite, inputs=[src]) as tmp:
            write_sharded_safetensors(tmp, plan.tensors, write_tensor, max_shard_bytes, progress)
            (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
            copy_side_files(src, tmp)
            # The export has no moetool block: its processor alone must shape images as trained.
            carry_training_processor(tmp, checkpoint_aspect_ratio(config))
    except UnsafeOverwriteError as err:
        raise ExportError(str(err)) from None
    finally:
        sources.close()
    return plan
