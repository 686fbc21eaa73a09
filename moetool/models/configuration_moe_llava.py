"""Configuration of a sparse VLM: its dense base's config with a typed ``moe`` sub-config.

One class per base (``models.bases``), made by ``sparse_config_class``: ``MoELlavaConfig`` for
LLaVA (model_type ``moetool_llava``), ``MoEQwen3VLConfig`` for Qwen3-VL (``moetool_qwen3_vl``),
… Each is the base's own config class plus two fields:

- ``moe``: the ``MoEConfig`` (checked, layers as explicit indices, the combine-weight mode
  decided), read once when the config is built from the checkpoint's plain ``moe`` section;
  sections written by older releases load, missing keys taking their defaults. Saved as plain
  data (``MoEConfig.to_dict``).
- ``moetool``: provenance (version, stage, recipe snapshot).
"""

from __future__ import annotations

import functools

from huggingface_hub.dataclasses import strict

from moetool.models.bases import get_base
from moetool.models.moe.config import MoEConfig

MOE_MODEL_TYPE = "moetool_llava"  # the LLaVA-1.5 layout's sparse model_type


@functools.cache
def sparse_config_class(base_model_type: str) -> type:
    """The sparse config class of a base (one class per base, made once)."""
    from transformers import CONFIG_MAPPING

    base = get_base(base_model_type)
    dense = CONFIG_MAPPING[base.model_type]

    @strict
    class SparseConfig(dense):
        model_type = base.sparse_model_type

        moe: MoEConfig | dict | None = None
        moetool: dict | None = None

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            if not isinstance(self.moe, MoEConfig):
                num_layers = self.get_text_config().num_hidden_layers
                self.moe = MoEConfig.from_dict(self.moe or {}, num_layers)

        def to_dict(self) -> dict:
            out = super().to_dict()
            if isinstance(out.get("moe"), MoEConfig):
                out["moe"] = out["moe"].to_dict()
            return out

    SparseConfig.__name__ = SparseConfig.__qualname__ = f"MoE{dense.__name__}"
    SparseConfig.__module__ = __name__
    SparseConfig.__doc__ = (
        f"{dense.__name__} whose language model's decoder layers listed in ``moe.layers`` hold "
        "a MoE block (see the module docstring)."
    )
    return SparseConfig


MoELlavaConfig = sparse_config_class("llava")
