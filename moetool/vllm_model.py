"""moetool's sparse LLaVA in vLLM: vLLM's Transformers backend for multimodal models, running
the transformers model that ``AutoModel`` builds for ``moetool_llava`` (``MoELlavaModel``),
with vLLM's attention, KV cache and scheduling. Imported only inside vLLM (see
``moetool.vllm_plugin``).

moetool checkpoints keep LLaVA's saved key layout (``language_model.model.*``,
``vision_tower.*``); they are renamed to the module names before vLLM's own mappings (its fused
q/k/v projections among them) apply.
"""

from __future__ import annotations

import re

from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

SAVED_TO_MODULES = {
    re.compile(r"^language_model\.model\."): "model.language_model.",
    re.compile(r"^language_model\.lm_head\."): "lm_head.",
    re.compile(r"^vision_tower\."): "model.vision_tower.",
    re.compile(r"^multi_modal_projector\."): "model.multi_modal_projector.",
}


@MULTIMODAL_REGISTRY.register_processor(
    MultiModalProcessor, info=MultiModalProcessingInfo, dummy_inputs=MultiModalDummyInputsBuilder
)
class MoELlavaForVLLM(TransformersMultiModalForCausalLM):
    def _create_hf_to_vllm_mapper(self) -> None:
        # Regex renames apply before vLLM's stacked (fused projection) names, which are module
        # names; mappings vLLM made earlier are kept.
        earlier = getattr(self, "hf_to_vllm_mapper", None)
        mapper = WeightsMapper(orig_to_new_regex=SAVED_TO_MODULES)
        self.hf_to_vllm_mapper = mapper if earlier is None else earlier | mapper
