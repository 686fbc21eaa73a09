"""The lmms-eval entry point (group ``lmms_eval.models``): kept import-light, it only names the
class, which lmms-eval imports when the ``moetool`` model is asked for."""

from lmms_eval.models.registry_v2 import ModelManifest

manifest = ModelManifest(model_id="moetool", simple_class_path="moetool.eval.lmms_model.MoeTool")
