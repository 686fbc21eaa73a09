"""Register the sparse LVLM with transformers' Auto classes.

``import moetool`` must stay cheap (the CLI imports it), while registration needs transformers'
LLaVA code. So ``import moetool`` registers at once when transformers' auto classes are already
imported, and otherwise right after the outermost transformers import that brings them in
finishes: transformers' modules import each other, and registering while any of them is
half-initialised fails. The same holds for moetool's own configuration and modeling modules,
which import transformers themselves: when one of them is the first to import it, registration
waits until that module has finished.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
# Modules that register() imports: registering must wait while one of them is mid-import.
_OWN = ("moetool.models.configuration_moe_llava", "moetool.models.modeling_moe_llava")
_done = False
_registering = False


def register() -> None:
    """Register the sparse model type of every base (``moetool_llava``, ``moetool_qwen3_vl``,
    …; ``models.bases``) with AutoConfig, AutoModel, AutoModelForImageTextToText and its base's
    checkpoint key conversions (idempotent)."""
    global _done, _registering
    if _done or _registering:
        return
    _registering = True
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )

        from moetool.models.bases import get_base, known_bases
        from moetool.models.modeling_moe_llava import sparse_classes

        for name in known_bases():
            config_class, model_class, generation_class = sparse_classes(name)
            sparse_type = get_base(name).sparse_model_type
            AutoConfig.register(sparse_type, config_class, exist_ok=True)
            AutoModel.register(config_class, model_class, exist_ok=True)
            AutoModelForImageTextToText.register(config_class, generation_class, exist_ok=True)
            # The base's checkpoint key layout (LLaVA's legacy `language_model.model.` keys,
            # Qwen2-VL's `model.layers.`, …), which transformers keys by model_type or by the
            # dense class's name: the sparse type and classes get the same.
            for key, dense_key in (
                (sparse_type, name),
                *(
                    (cls.__name__, cls.__name__.removeprefix("MoE"))
                    for cls in (model_class, generation_class)
                ),
            ):
                conversions = get_checkpoint_conversion_mapping(dense_key)
                if conversions is not None:
                    register_checkpoint_conversion_mapping(key, conversions, overwrite=True)
        _done = True
    finally:
        _registering = False


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.") or name in _OWN


def _imports_busy(finished: str | None) -> bool:
    """True while a transformers module, or a moetool module that registration imports, other
    than ``finished`` (whose body just ran) is still executing, i.e. part of an import in
    progress."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if _watched(name) and name != finished
    )


def _register_when_ready(finished: str | None = None) -> None:
    if _done or _registering or _CONFIG_AUTO not in sys.modules or _imports_busy(finished):
        return
    register()
    for finder in [f for f in sys.meta_path if isinstance(f, _RegisterAfterImport)]:
        sys.meta_path.remove(finder)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of every transformers module (and of moetool's configuration and
    modeling modules) to try registering after it executes."""

    def find_spec(self, fullname, path, target=None):
        if _done or not _watched(fullname):
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _register_when_ready(fullname)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    _register_when_ready()
    if not _done and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
