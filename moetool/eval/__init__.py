"""Evaluation through lmms-eval: the ``moetool`` model plugin, local task data, the task runner
and the paper's reference figures."""
