"""The attention implementation of the vision tower and the language model
(``model.attn_implementation``): the names transformers dispatches on, whether one can run
where it is asked to, and where a checkpoint records the one it was trained with.

torch is imported inside the functions: the recipe schema imports this module.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Literal, get_args

# transformers' ``attn_implementation`` names (its AttentionInterface keys and "eager").
AttnImplementation = Literal[
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"

# The module each flash backend imports, and how to get it.
FLASH_MODULES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": (
        "flash_attn_interface",
        "FlashAttention 3's Hopper build: `cd hopper && python setup.py install` in a clone of "
        "github.com/Dao-AILab/flash-attention",
    ),
}
FLASH_MIN_CAPABILITY = 8  # Ampere; what transformers requires of both flash backends
_HALF = {"bfloat16", "float16"}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class AttentionUnavailable(ValueError):
    """An attention implementation that cannot run here; the message says what is missing."""


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def attention_problems(
    name: str,
    device: str,
    dtype: str,
    training: bool = False,
    dtype_key: str = "",
    *,
    cuda_capability: Callable[[], tuple[int, int] | None] = _cuda_capability,
    has_module: Callable[[str], bool] = module_available,
) -> list[str]:
    """What stops attention ``name`` from running on ``device`` ("cpu", "cuda", "cuda:1") in
    ``dtype`` (a stage precision "bf16"/"fp16"/"fp32" or a torch dtype name), each naming
    how to get it; empty when it can run. ``training``: backward passes too; ``dtype_key``:
    the setting that chose ``dtype`` (named in the advice). The machine is asked through
    ``cuda_capability`` (None without a GPU) and ``has_module``."""
    if name not in ATTN_IMPLEMENTATIONS:
        return [
            f"unknown attention implementation {name!r}; known: {', '.join(ATTN_IMPLEMENTATIONS)}"
        ]
    shown = str(dtype).removeprefix("torch.")
    dtype = _DTYPE_NAMES.get(shown, shown)
    on_cuda = device.split(":")[0] == "cuda"
    out = []
    if name in FLASH_MODULES:
        capability = cuda_capability()
        if capability is None:
            out.append("it needs a CUDA GPU (none is visible here)")
        elif not on_cuda:
            out.append(f"it runs on a CUDA GPU, not on {device} (pass --device cuda)")
        elif capability[0] < FLASH_MIN_CAPABILITY:
            out.append(
                f"it needs an Ampere or newer GPU (compute capability >= "
                f"{FLASH_MIN_CAPABILITY}.0), found {capability[0]}.{capability[1]}"
            )
        module, how = FLASH_MODULES[name]
        if not has_module(module):
            out.append(f"the {module} package is not installed ({how})")
        if dtype not in _HALF:
            where = f"set {dtype_key} to bf16" if dtype_key else "use bf16"
            out.append(f"it takes bf16 or fp16 only, not {shown} ({where})")
    elif name == "flex_attention":
        if not has_module("torch.nn.attention.flex_attention"):
            import torch

            out.append(f"torch {torch.__version__} has no flex_attention (it needs torch >= 2.5)")
        elif training and not on_cuda:
            out.append(
                "torch's flex_attention has no backward pass on the CPU (use sdpa or eager, "
                "or train on a CUDA GPU)"
            )
    return out


def family_problems(name: str, model_type: str) -> list[str]:
    """Why the language model of ``model_type`` cannot attend with ``name`` in transformers
    (empty when it can, or for a family moetool does not know)."""
    from moetool.models.families import get_family

    family = get_family(model_type, missing_ok=True)
    if family is None or name not in family.attn_unsupported:
        return []
    usable = [n for n in ATTN_IMPLEMENTATIONS if n not in family.attn_unsupported]
    return [f"transformers' {model_type} has no {name} attention; use {', '.join(usable)}"]


def check_attn_implementation(
    name: str, device: str, dtype: str, training: bool = False, dtype_key: str = "", **machine
) -> None:
    """Raise ``AttentionUnavailable`` (one line) when attention ``name`` cannot run on
    ``device`` in ``dtype`` (see ``attention_problems``)."""
    problems = attention_problems(name, device, dtype, training, dtype_key, **machine)
    if name not in ATTN_IMPLEMENTATIONS:
        raise AttentionUnavailable(problems[0])
    if problems:
        raise AttentionUnavailable(f"attention {name!r} cannot run here: {'; '.join(problems)}")


def checkpoint_attn_implementation(config: dict) -> str | None:
    """The attention implementation a checkpoint was trained with, from its config's
    ``moetool`` block (``attn_implementation``, else the recipe snapshot's
    ``model.attn_implementation``); None for a checkpoint that records none (transformers'
    default then: sdpa where the model has it, else eager)."""
    meta = config.get("moetool")
    if not isinstance(meta, dict):
        return None
    if meta.get("attn_implementation"):
        return meta["attn_implementation"]
    model = (meta.get("recipe") or {}).get("model") or {}
    return model.get("attn_implementation") or None
