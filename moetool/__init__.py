"""moetool: sparse Mixture-of-Experts vision-language models (MoE-LLaVA), from recipe to eval.

Importing moetool registers the sparse LVLM (model type ``moetool_llava``) with transformers'
Auto classes, so ``AutoModelForImageTextToText.from_pretrained`` loads moetool checkpoints.
"""

from moetool._version import __version__
from moetool.models.registration import install as _install_auto_classes

__all__ = ["__version__"]

_install_auto_classes()
