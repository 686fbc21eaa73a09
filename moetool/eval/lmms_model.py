"""lmms-eval model class for moetool checkpoints (dense and sparse): batched greedy generation
with the KV cache, the checkpoint's chat template and its image preprocessing."""

from __future__ import annotations

import unicodedata

import torch
from lmms_eval import utils
from lmms_eval.api.model import lmms

import moetool  # noqa: F401  (registers the sparse model)
from moetool.data.templates import IMAGE_PLACEHOLDER as IMAGE_TOKEN


def load_checkpoint(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, processor) of a moetool checkpoint, through transformers' Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def training_aspect_ratio(config) -> str:
    """How the checkpoint's last training stage shaped images ("pad" or "resize")."""
    meta = getattr(config, "moetool", None) or {}
    stages = (meta.get("recipe") or {}).get("stages") or {}
    stage = stages.get(meta.get("stage")) or {}
    return stage.get("image_aspect_ratio", "pad")


def prepare_image(image, processor, aspect_ratio: str):
    """The image as training saw it: padded to a square with the processor's mean colour, or
    left for the processor to resize."""
    from moetool.data.preprocess import expand_to_square

    image = image.convert("RGB")
    if aspect_ratio == "pad":
        mean = processor.image_processor.image_mean
        image = expand_to_square(image, tuple(int(255 * m) for m in mean))
    return image


def build_prompt(tokenizer, question: str, images: int) -> str:
    """The question with one ``<image>`` per image, in the checkpoint's chat template."""
    content = (IMAGE_TOKEN + "\n") * images + question if IMAGE_TOKEN not in question else question
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    return content


def _printable(text: str) -> str:
    """Drop control characters (byte-level tokens of an untrained model can decode to them; they
    are never an answer, and lmms-eval's spreadsheet writers reject them)."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


class MoeTool(lmms):
    is_simple = True

    def __init__(
        self, pretrained: str, device: str = "cpu", batch_size=1, dtype="float32", **kwargs
    ):
        super().__init__()
        self.model, self.processor = load_checkpoint(pretrained, dtype, device)
        self.device_name = device
        self.batch_size = int(batch_size)
        self.aspect_ratio = training_aspect_ratio(self.model.config)

    def clean(self):
        """Keep the model across evaluations (lmms-eval's default deletes every module)."""

    def generate_until(self, requests) -> list[str]:
        collator = utils.Collator(
            [r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True
        )
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, gen_kwargs, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            kwargs = dict(gen_kwargs[0])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images, prompts = [], []
            for context, visual, doc_id, task, split in zip(
                contexts, to_visual, doc_ids, tasks, splits, strict=True
            ):
                visuals = [
                    v.convert("RGB")
                    for v in visual(self.task_dict[task][split][doc_id])
                    if v is not None
                ]
                images += visuals
                prompts.append(build_prompt(tokenizer, context, len(visuals)))
            inputs = self.processor(
                images=images or None, text=prompts, padding=True, return_tensors="pt"
            ).to(self.device_name)
            with torch.no_grad():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=int(kwargs.get("max_new_tokens", 128)),
                    do_sample=False,  # greedy, whatever the task's temperature
                    num_beams=int(kwargs.get("num_beams") or 1),
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for text in texts:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(_printable(text).strip())
        return collator.get_original(answers)

    def loglikelihood(self, requests):
        raise NotImplementedError("moetool evaluates generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("moetool evaluates single-round tasks only")
