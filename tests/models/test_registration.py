"""`import moetool` registers the sparse model with the Auto classes, whatever the import order."""

import subprocess
import sys

import pytest

CHECK = (
    "from transformers import AutoModelForImageTextToText\n"
    "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
    "from moetool.models.configuration_moe_llava import MoELlavaConfig\n"
    "ok = 'moetool_llava' in CONFIG_MAPPING and "
    "MoELlavaConfig in AutoModelForImageTextToText._model_mapping\n"
    "print('registered' if ok else 'missing')\n"
)

ORDERS = {
    "moetool first": "import moetool\n",
    "transformers auto first": "import transformers.models.auto.modeling_auto\nimport moetool\n",
    "llava config first": "from transformers import LlavaConfig\nimport moetool\n",
    "llava model after moetool": (
        "import moetool\nfrom transformers import LlavaForConditionalGeneration\n"
    ),
    "llava config after moetool, under meta": (
        "import torch, moetool\n"
        "with torch.device('meta'):\n"
        "    from transformers import LlavaConfig, LlavaForConditionalGeneration\n"
    ),
    "AutoConfig only": "import moetool\nfrom transformers import AutoConfig\n",
    "image processor first": "import moetool\nfrom transformers import CLIPImageProcessor\n",
    # moetool's own modules import transformers: registration must wait for them to finish.
    "sparse model class first": (
        "from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration\n"
    ),
    "sparse config class first": (
        "from moetool.models.configuration_moe_llava import MoELlavaConfig\n"
    ),
    "transformers, then the sparse model class": (
        "import transformers\n"
        "from moetool.models.modeling_moe_llava import MoELlavaForConditionalGeneration\n"
    ),
}


@pytest.mark.parametrize("prelude", list(ORDERS.values()), ids=list(ORDERS))
def test_registration_in_any_import_order(prelude):
    out = subprocess.run([sys.executable, "-c", prelude + CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "registered"
