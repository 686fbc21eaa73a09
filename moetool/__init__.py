"""moetool: sparse Mixture-of-Experts vision-language models (MoE-LLaVA), from recipe to eval.

Importing moetool registers the sparse VLM of every base (model types ``moetool_llava``,
``moetool_qwen3_vl``, …; ``moetool.models.bases``) with transformers' Auto classes, so
``AutoModelForImageTextToText.from_pretrained`` loads moetool checkpoints.
"""

from moetool._version import __version__
from moetool.models.registration import install as _install_auto_classes

__all__ = ["__version__"]

_install_auto_classes()
