"""Batched greedy answers (moetool.models.inference.answer)."""

import torch
from PIL import Image

from moetool.models.build import build_random_lvlm
from moetool.models.inference import answer
from moetool.models.presets import preset_recipe


def test_answer_passes_generate_kwargs_on():
    torch.manual_seed(0)
    model, processor = build_random_lvlm(preset_recipe("tiny-llama"))
    model.eval()
    new_tokens: list[list[int]] = []
    generate = model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        new_tokens.append(out[0, kwargs["input_ids"].shape[1] :].tolist())
        return out

    model.generate = recording_generate
    args = (model, processor, ["Is there a red circle?"], [[Image.new("RGB", (20, 12), "red")]])
    answer(*args, max_new_tokens=3)
    first = new_tokens[0][0]
    answer(*args, max_new_tokens=3, generate_kwargs={"suppress_tokens": [first]})
    assert new_tokens[1][0] != first  # greedy's first choice was suppressed
    assert first not in new_tokens[1]
