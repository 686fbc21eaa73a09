"""moetool: sparse Mixture-of-Experts vision-language models (MoE-LLaVA), from recipe to eval."""

__version__ = "0.1.0.dev0"
