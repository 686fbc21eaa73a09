"""Configuration of the sparse LVLM: a LLaVA config with a ``moe`` section."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from moetool.models.moe.config import MoEConfig

MOE_MODEL_TYPE = "moetool_llava"


@strict
class MoELlavaConfig(LlavaConfig):
    """LLaVA-1.5 layout whose decoder layers listed in ``moe["layers"]`` hold a MoE block.

    ``moe``: a ``MoEConfig`` as plain data (``MoEConfig.to_dict``), checked and resolved when
    the config is built (layers as explicit indices); sections written by older releases load,
    missing keys taking their defaults. ``moetool``: provenance (version, stage, recipe snapshot).
    """

    model_type = MOE_MODEL_TYPE

    moe: dict | None = None
    moetool: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        num_layers = self.text_config.num_hidden_layers
        self.moe = MoEConfig.from_dict(self.moe or {}, num_layers).to_dict()
