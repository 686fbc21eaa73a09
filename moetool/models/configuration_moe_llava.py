"""Configuration of the sparse LVLM: a LLaVA config with a ``moe`` section."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

MOE_MODEL_TYPE = "moetool_llava"
MOE_KEYS = {
    "num_experts": int,
    "top_k": int,
    "layers": list,  # explicit decoder-layer indices
    "capacity_factor": float,
    "eval_capacity_factor": float,
    "min_capacity": int,
    "aux_loss_coef": float,
    "z_loss_coef": float,
    "normalize_top_k": bool,
}


@strict
class MoELlavaConfig(LlavaConfig):
    """LLaVA-1.5 layout whose decoder layers listed in ``moe["layers"]`` hold a MoE block.

    ``moe``: num_experts, top_k, layers (explicit indices), capacity_factor,
    eval_capacity_factor (0 = dropless), min_capacity, aux_loss_coef (alpha of Eq. 7),
    z_loss_coef, normalize_top_k. ``moetool``: provenance (version, stage, recipe snapshot).
    """

    model_type = MOE_MODEL_TYPE

    moe: dict | None = None
    moetool: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.moe = normalize_moe_section(self.moe or {}, self.text_config.num_hidden_layers)


def normalize_moe_section(moe: dict, num_layers: int) -> dict:
    """Fill defaults and check a ``moe`` config section; raises ValueError naming the key."""
    out = {
        "num_experts": 4,
        "top_k": 2,
        "layers": list(range(num_layers)[::2]),
        "capacity_factor": 0.0,
        "eval_capacity_factor": 0.0,
        "min_capacity": 0,
        "aux_loss_coef": 0.01,
        "z_loss_coef": 0.0,
        "normalize_top_k": True,
    }
    unknown = sorted(set(moe) - set(MOE_KEYS))
    if unknown:
        raise ValueError(f"moe: unknown key(s) {unknown}; known: {', '.join(MOE_KEYS)}")
    out.update(moe)
    problems = []
    if out["num_experts"] < 2:
        problems.append(f"moe.num_experts must be >= 2, got {out['num_experts']}")
    if not 1 <= out["top_k"] <= out["num_experts"]:
        problems.append(f"moe.top_k must be in 1..num_experts, got {out['top_k']}")
    layers = [int(i) for i in out["layers"]]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        problems.append(
            f"moe.layers {out['layers']} must be non-empty indices in 0..{num_layers - 1}"
        )
    if problems:
        raise ValueError("; ".join(problems))
    out["layers"] = sorted(set(layers))
    return out
