"""Register the sparse LVLM with transformers' Auto classes.

``import moetool`` must stay cheap (the CLI imports it), while registration needs transformers'
LLaVA modeling code. So ``import moetool`` registers at once when transformers' auto-modeling
and LLaVA modules are already imported, and otherwise registers right after they are: the
registration runs when the later of the two finishes importing (either may import the other).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_AUTO_MODELING = "transformers.models.auto.modeling_auto"
_LLAVA_MODELING = "transformers.models.llava.modeling_llava"
_done = False


def register() -> None:
    """Register ``moetool_llava`` with AutoConfig and AutoModelForImageTextToText (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from moetool.models.configuration_moe_llava import MOE_MODEL_TYPE, MoELlavaConfig
    from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration

    AutoConfig.register(MOE_MODEL_TYPE, MoELlavaConfig, exist_ok=True)
    # Same checkpoint key layout as LLaVA (including its legacy `language_model.model.` keys).
    register_checkpoint_conversion_mapping(
        MOE_MODEL_TYPE, get_checkpoint_conversion_mapping("llava"), overwrite=True
    )
    AutoModelForImageTextToText.register(
        MoELlavaConfig, MoELlavaForConditionalGeneration, exist_ok=True
    )


def _importing(name: str, attribute: str) -> bool:
    """True while module ``name`` is being executed (present but not yet complete)."""
    module = sys.modules.get(name)
    return module is not None and not hasattr(module, attribute)


def _register_when_ready() -> None:
    if _importing(_LLAVA_MODELING, "LlavaForConditionalGeneration") or _importing(
        _AUTO_MODELING, "AutoModelForImageTextToText"
    ):
        return  # the module still executing registers when it completes
    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.watching = {_AUTO_MODELING, _LLAVA_MODELING} - set(sys.modules)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.watching:
            return None
        self.watching.discard(fullname)
        if not self.watching:
            sys.meta_path.remove(self)
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
    if _AUTO_MODELING in sys.modules and _LLAVA_MODELING in sys.modules:
        _register_when_ready()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
