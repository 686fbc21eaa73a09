"""Register the sparse LVLM with transformers' Auto classes.

``import moetool`` must stay cheap (the CLI imports it), while registration needs transformers'
LLaVA code. So ``import moetool`` registers at once when transformers' auto and LLaVA modules
are already imported, and otherwise right after the outermost of them finishes importing: these
modules import each other, and registering while one of them is half-initialised would fail.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

# Modules registration needs, with an attribute that exists once each is fully executed.
_NEEDED = {
    "transformers.models.auto.configuration_auto": "CONFIG_MAPPING",
    "transformers.models.auto.modeling_auto": "AutoModelForImageTextToText",
    "transformers.models.llava.configuration_llava": "LlavaConfig",
    "transformers.models.llava.modeling_llava": "LlavaForConditionalGeneration",
}
_done = False
_registering = False


def register() -> None:
    """Register ``moetool_llava`` with AutoConfig, AutoModelForImageTextToText and the
    checkpoint key conversions (idempotent)."""
    global _done, _registering
    if _done or _registering:
        return
    _registering = True
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )

        from moetool.models.configuration_moe_llava import MOE_MODEL_TYPE, MoELlavaConfig
        from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration

        AutoConfig.register(MOE_MODEL_TYPE, MoELlavaConfig, exist_ok=True)
        AutoModelForImageTextToText.register(
            MoELlavaConfig, MoELlavaForConditionalGeneration, exist_ok=True
        )
        # Same checkpoint key layout as LLaVA (including its legacy `language_model.model.` keys).
        register_checkpoint_conversion_mapping(
            MOE_MODEL_TYPE, get_checkpoint_conversion_mapping("llava"), overwrite=True
        )
        _done = True
    finally:
        _registering = False


def _half_initialised() -> bool:
    return any(
        name in sys.modules and not hasattr(sys.modules[name], attribute)
        for name, attribute in _NEEDED.items()
    )


def _register_when_ready() -> None:
    if not _done and not _registering and not _half_initialised():
        register()
        for finder in [f for f in sys.meta_path if isinstance(f, _RegisterAfterImport)]:
            sys.meta_path.remove(finder)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the needed modules to try registering after each one executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _NEEDED or _done:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _register_when_ready()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if any(name in sys.modules for name in _NEEDED):
        _register_when_ready()
    if not _done and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
