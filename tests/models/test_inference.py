"""Batched greedy answers (moetool.models.inference.answer)."""

import torch
from PIL import Image

from moetool.models.inference import answer
from moetool.tiny import build_random_lvlm, preset_recipe


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


def test_transformers_pipeline_runs_on_a_moetool_checkpoint(tmp_path):
    """The "image-text-to-text" pipeline renders structured messages with the checkpoint's chat
    template into the prompt moetool builds, image placeholder included."""
    from transformers import pipeline

    from moetool.data.templates import get_template
    from moetool.models.build import save_checkpoint
    from moetool.models.inference import build_prompt

    recipe = preset_recipe("tiny-qwen2")
    model, processor = build_random_lvlm(recipe)
    # As training saves every checkpoint: with its recipe's chat template.
    processor.tokenizer.chat_template = get_template(recipe.data.template).jinja()
    save_checkpoint(model, processor, tmp_path / "ckpt")
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "ckpt"))
    parts = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    rendered = pipe.processor.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == build_prompt(pipe.tokenizer, "What colour?", 1)
    image = Image.new("RGB", (20, 12), "red")
    parts[0]["image"] = image
    out = pipe(text=[{"role": "user", "content": parts}], max_new_tokens=3)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def _pixels(processor, image):
    return processor.image_processor(image, return_tensors="pt")["pixel_values"]


def test_load_checkpoint_shapes_images_as_the_checkpoint_was_trained(tmp_path):
    """An old checkpoint (a CLIP processor that crops, a pad-trained recipe) is padded; a
    resize-trained one is not; one moetool did not write keeps its processor as shipped."""
    from transformers import CLIPImageProcessor

    from moetool.data.preprocess import expand_to_square
    from moetool.models.build import save_checkpoint
    from moetool.models.inference import load_checkpoint

    recipe = preset_recipe("tiny-qwen2")
    model, processor = build_random_lvlm(recipe)
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.image_processor = clip
    wide = Image.new("RGB", (96, 64), (200, 10, 10))
    fill = tuple(int(255 * m) for m in clip.image_mean)
    padded, cropped = _pixels(processor, expand_to_square(wide, fill)), _pixels(processor, wide)
    assert not torch.equal(padded, cropped)
    for ratio, expected in (("pad", padded), ("resize", cropped), (None, cropped)):
        meta = None
        if ratio is not None:
            stages = {"instruct": {"image_aspect_ratio": ratio}}
            meta = {"stage": "instruct", "recipe": {"stages": stages}}
        save_checkpoint(model, processor, tmp_path / str(ratio), metadata=meta)
        _, loaded = load_checkpoint(tmp_path / str(ratio))
        assert torch.equal(_pixels(loaded, wide), expected), ratio
        model.config.moetool = None
