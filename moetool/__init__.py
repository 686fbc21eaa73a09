"""moetool: sparse Mixture-of-Experts vision-language models (MoE-LLaVA), from recipe to eval.

Importing moetool registers the sparse LVLM (model type ``moetool_llava``) with transformers'
Auto classes, so ``AutoModelForImageTextToText.from_pretrained`` loads moetool checkpoints.
"""

from moetool.models.registration import install as _install_auto_classes

__version__ = "0.1.0.dev0"

_install_auto_classes()
