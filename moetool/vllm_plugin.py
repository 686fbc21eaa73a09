"""vLLM plugin (entry point ``vllm.general_plugins``, run in every vLLM process): serves moetool's
sparse checkpoints — the bases that have no native MoE architecture to export to (phi, stablelm,
gemma2), and any other — through vLLM's Transformers backend.

vLLM stays optional: nothing here imports it unless vLLM calls ``register``, and the model class
(``moetool.vllm_model``) is imported by vLLM only when it loads a moetool checkpoint.
"""

from __future__ import annotations

ARCHITECTURE = "MoELlavaForConditionalGeneration"


def register() -> None:
    """Register the sparse architecture with transformers' Auto classes (what vLLM's
    Transformers backend builds) and with vLLM's model registry."""
    from vllm import ModelRegistry

    from moetool.models.registration import register as register_with_transformers

    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "moetool.vllm_model:MoELlavaForVLLM")
