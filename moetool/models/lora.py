"""Low-rank adapters on a moetool LVLM, through peft (and bitsandbytes for QLoRA).

The recipe's ``[lora]`` names parts (``experts``, ``ffn``, ``attention``, …); the linear layers
of those parts, found by the family registry (``models.parts``), get peft LoRA adapters, and the
stage's other ``trainable`` parts (the routers in stage III) train in full as peft
``modules_to_save``: a router is a new H x E matrix, computed in fp32 (``MoERouter``), and its
fp32 master weights are the optimizer's as in full MoE-Tuning. The merged checkpoint is an
ordinary moetool checkpoint: every adapter folded into its layer by peft's own delta, quantized
base weights dequantized by peft's helper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from moetool.models.parts import expand_parts, parameter_parts

if TYPE_CHECKING:
    from torch import nn

ADAPTER = "default"  # peft's adapter name: one adapter per stage
PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's names


# Parts whose linear layers take LoRA adapters (routers never: they are new and train in full).
LORA_TARGETS = ("vision", "projector", "attention", "ffn", "experts", "lm_head")
# Parts whose weights lora.quantize stores in 4 or 8 bits (the language model's linear layers
# but its routers and head): they cannot also train in full.
QUANTIZED_PARTS = ("attention", "ffn", "experts", "llm_other")


@dataclass(frozen=True)
class LoraSection:
    """Low-rank adapters (peft) on the ``targets`` of the ``stages`` listed, the rest of the
    stage's ``trainable`` parts (the routers in stage III) training in full."""

    stages: tuple[str, ...] = ("moe_tune",)  # the stages that train adapters
    r: int = 128  # LLaVA-1.5's LoRA recipe (finetune_lora.sh): r 128, alpha 256, dropout 0.05
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("ffn",)  # parts whose linear layers get adapters
    # How the adapters of one layer's experts start: "independent" draws each expert's A from
    # its own seed (the experts differ from the first step on); "identical" gives every expert
    # of a layer the same adapter (they differ only through the tokens routed to them).
    expert_init: Literal["independent", "identical"] = "independent"
    quantize: Literal["none", "nf4", "int8"] = "none"  # frozen LM weights through bitsandbytes
    save: Literal["merged", "adapter", "both"] = "merged"

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []  # (key, message); stage names are checked by the recipe
        if not self.stages:
            out.append(("stages", "is empty: name the stages that train adapters"))
        if self.r <= 0:
            out.append(("r", f"must be a positive integer, got {self.r}"))
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            out.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            out.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if "routers" in self.targets:
            out.append(
                (
                    "targets",
                    "routers take no adapter: they are new matrices and train in full (list "
                    "them in the stage's trainable)",
                )
            )
        unknown = [t for t in self.targets if t not in LORA_TARGETS and t != "routers"]
        if unknown:
            out.append(("targets", f"unknown part(s) {unknown}; known: {', '.join(LORA_TARGETS)}"))
        if not self.targets:
            out.append(("targets", "is empty: name the parts that get adapters"))
        return out


class LoraError(ValueError):
    """The recipe's ``[lora]`` cannot apply to this model or machine."""


def target_modules(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the linear layers whose weights belong to the ``targets`` parts (a router
    is never one: it belongs to "routers")."""
    from torch import nn

    parts = parameter_parts(model)
    wanted = expand_parts(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and parts.get(f"{name}.weight") in wanted
    ]


def owning_modules(trainable: list[str]) -> list[str]:
    """The modules that hold the parameters named in ``trainable`` (trained in full)."""
    return sorted({name.rpartition(".")[0] for name in trainable})


def quantization_config(lora: LoraSection, dtype):
    """transformers' ``BitsAndBytesConfig`` for ``lora.quantize``: the language model's linear
    layers in nf4 or int8, computing in ``dtype``; the vision tower, projector, LM head and
    routers stay in full precision. A ``LoraError`` when bitsandbytes is not installed."""
    from transformers import BitsAndBytesConfig

    check_quantization(lora)
    keep = list(FULL_PRECISION_MODULES)
    if lora.quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=keep,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


# Never quantized (transformers' patterns: a prefix of the full name, or a suffix): the LLaVA
# layout's tower and projector, the head, and each MoE layer's router.
FULL_PRECISION_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head", "router")


def check_quantization(lora: LoraSection) -> None:
    """A ``LoraError`` in one line when ``lora.quantize`` cannot run here."""
    if lora.quantize == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise LoraError(
            f"lora.quantize = {lora.quantize!r} needs bitsandbytes ({err}): "
            "pip install 'moetool[qlora]'"
        ) from None


def apply_lora(model: nn.Module, lora: LoraSection, trainable: list[str]):
    """``model`` with peft adapters on the linear layers of ``lora.targets``; the modules of
    the ``trainable`` parameters (set by ``set_trainable``) train in full. The experts' adapters
    start as ``lora.expert_init`` says. Returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, lora.targets)
    if not targets:
        raise LoraError(f"lora.targets {list(lora.targets)} select no linear layer of this model")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=owning_modules(trainable) or None,
        bias="none",
    )
    # The name peft writes into adapter_config.json: the checkpoint the adapters sit on.
    path = getattr(model, "name_or_path", "")
    if path:
        from pathlib import Path

        if Path(path).is_dir():
            model.name_or_path = str(Path(path).resolve())
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if lora.expert_init == "identical":
        share_expert_adapters(peft_model)
    return peft_model


def expert_adapters(model: nn.Module) -> list[list[dict[str, nn.Module]]]:
    """Per MoE block, per expert: the expert's LoRA layers by their name inside the expert."""
    from peft.tuners.lora import LoraLayer

    from moetool.models.moe import MoEBlock

    out = []
    for block in model.modules():
        if isinstance(block, MoEBlock):
            out.append(
                [
                    {n: m for n, m in expert.named_modules() if isinstance(m, LoraLayer)}
                    for expert in block.experts
                ]
            )
    return out


def share_expert_adapters(model: nn.Module) -> None:
    """Every expert of a layer starts from its first expert's adapters ("identical")."""
    import torch

    with torch.no_grad():
        for experts in expert_adapters(model):
            first = experts[0]
            for other in experts[1:]:
                for name, layer in other.items():
                    for kind in ("lora_A", "lora_B"):
                        getattr(layer, kind)[ADAPTER].weight.copy_(
                            getattr(first[name], kind)[ADAPTER].weight
                        )


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def merged_state_dict(peft_model, state_dict: dict, dtype, rank: int, partitioned: bool) -> dict:
    """The plain sparse (or dense) model's state on rank 0 (an empty dict elsewhere): every
    adapter folded into its layer with peft's ``get_delta_weight``, quantized weights
    dequantized, the fully trained copies of ``modules_to_save`` in place of the originals.
    ``state_dict`` is ``full_state_dict`` of the ``PeftModel``. Every rank must call it (under
    ZeRO-3 each adapted layer is gathered)."""
    import contextlib

    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.integrations import dequantize_module_weight

    base = peft_model.get_base_model()
    replaced: dict[str, dict[str, torch.Tensor]] = {}  # module name -> its new tensors
    for name, module in base.named_modules():
        if any(name.startswith(f"{owner}.") for owner in replaced):
            continue  # inside an adapted layer (its base layer, its adapters): done with it
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            gather = contextlib.nullcontext()
            if partitioned:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(
                    list(module.parameters()), modifier_rank=None
                )
            with gather, torch.no_grad():
                if rank == 0:
                    weight = dequantize_module_weight(layer).float().cpu()
                    delta = module.get_delta_weight(ADAPTER).float().cpu()
                    tensors = {"weight": (weight + delta).to(dtype)}
                    if getattr(layer, "bias", None) is not None:
                        tensors["bias"] = layer.bias.detach().to("cpu", dtype, copy=True)
                    replaced[name] = tensors
        elif _is_quantized(module) and rank == 0:
            with torch.no_grad():
                tensors = {"weight": dequantize_module_weight(module).to("cpu", dtype)}
                if module.bias is not None:
                    tensors["bias"] = module.bias.detach().to("cpu", dtype, copy=True)
            replaced[name] = tensors
        elif isinstance(module, ModulesToSaveWrapper) and rank == 0:
            trained = f"{PEFT_PREFIX}{name}.modules_to_save.{ADAPTER}."
            replaced[name] = {
                k[len(trained) :]: v for k, v in state_dict.items() if k.startswith(trained)
            }
    if rank != 0:
        return {}
    out: dict[str, torch.Tensor] = {}
    owners = sorted(replaced, key=len, reverse=True)
    for key, tensor in state_dict.items():
        plain = key.removeprefix(PEFT_PREFIX)
        if not any(plain.startswith(f"{owner}.") for owner in owners):
            out[plain] = tensor
    for owner, tensors in replaced.items():
        out.update({f"{owner}.{k}": v for k, v in tensors.items()})
    return out


def adapter_state_dict(peft_model, state_dict: dict) -> dict:
    """What peft saves as the adapter (LoRA weights and the fully trained modules) from the
    ``PeftModel``'s whole ``state_dict`` (gathered)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=ADAPTER)


def plain_model(peft_model):
    """A model of the wrapped model's class and config without adapters or quantization, on
    the meta device: what the merged state is saved through (``save_pretrained``)."""
    import copy

    import torch

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(base)(config)
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain
