"""Inference on moetool checkpoints (dense and sparse): loading, with the processor that shapes
images as training did; prompts in the checkpoint's chat template; batched greedy answers. Used
by ``moetool predict``, routing capture and the lmms-eval plugin."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

from moetool.data.templates import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from moetool.models.bases import is_llava_layout


def checkpoint_attention(
    path: str | Path,
    override: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    dtype_key: str = "",
) -> str | None:
    """The attention implementation to run checkpoint ``path`` with: ``override``
    (``--attn-implementation``), else the one its training recorded (None if none:
    transformers' default). Raises
    ``AttentionUnavailable`` (one line, naming the flag) when it cannot run on ``device`` in
    ``dtype``; reads only ``config.json``, so it can run before anything is loaded."""
    import json

    from moetool.models.attention import (
        AttentionUnavailable,
        check_attn_implementation,
        checkpoint_attn_implementation,
        family_problems,
    )

    config_file = Path(path) / "config.json"  # none: the loader says what is wrong
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    name = override or checkpoint_attn_implementation(config)
    if name is None:
        return None  # transformers' default: sdpa where the model has it, else eager
    model_type = (config.get("text_config") or {}).get("model_type", "")
    try:
        problems = family_problems(name, model_type)
        if problems:
            raise AttentionUnavailable(f"attention {name!r} cannot run: {problems[0]}")
        check_attn_implementation(name, device, dtype, dtype_key=dtype_key)
    except AttentionUnavailable as err:
        if override is not None:
            raise AttentionUnavailable(f"--attn-implementation {override}: {err}") from None
        raise AttentionUnavailable(
            f"{path} was trained with attn_implementation {name!r}: {err}; pass "
            "--attn-implementation sdpa (or eager) to run it with another"
        ) from None
    return name


def load_checkpoint(
    path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
):
    """(model, processor) of a moetool checkpoint, through transformers' Auto classes, its
    tower and LM attending with ``attn_implementation`` (None: the one its training recorded;
    see ``checkpoint_attention``). The processor shapes images as training did: the
    checkpoint's own, which does so by itself for every checkpoint moetool now writes; one
    written before processors carried the padding (a CLIP/SigLIP processor, a pad-trained
    recipe) is given the padding here."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moetool.data.image_processing import training_image_processor
    from moetool.models.build import checkpoint_aspect_ratio
    from moetool.models.registration import register

    register()  # the sparse model type, for the Auto classes

    attention = checkpoint_attention(path, attn_implementation, device, dtype)
    transformers.utils.logging.disable_progress_bar()  # one answer, no loading bars
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attention
    )
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    aspect_ratio = checkpoint_aspect_ratio(model.config.to_dict())
    if aspect_ratio is not None:
        processor.image_processor = training_image_processor(
            processor.image_processor, aspect_ratio
        )
    return model.to(device).eval(), processor


def training_aspect_ratio(config) -> str:
    """How the checkpoint's last training stage shaped images ("pad" or "resize")."""
    from moetool.models.build import checkpoint_aspect_ratio

    meta = getattr(config, "moetool", None)
    return checkpoint_aspect_ratio({"moetool": meta if isinstance(meta, dict) else {}}) or "pad"


def build_prompt(processor, question: str, images: int, model_type: str = "llava") -> str:
    """The question with its images in the checkpoint's chat template. LLaVA-layout checkpoints
    (moetool's templates; ``processor`` may be the tokenizer): one ``<image>`` line per image.
    Other bases (``model_type`` of the dense or sparse model): the base's own chat template
    with one image part per image, as its processor expands them, and the assistant's turn
    opened."""
    if not is_llava_layout(model_type):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    content = (IMAGE_TOKEN + "\n") * images + question if IMAGE_TOKEN not in question else question
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content


def printable(text: str) -> str:
    """Drop control characters (byte-level tokens of an untrained model can decode to them; they
    are never an answer, and lmms-eval's spreadsheet writers reject them)."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


def prompt_inputs(processor, questions: Sequence[str], images: Sequence[Sequence], model_type: str):
    """The model inputs that ask ``questions``, the i-th about the PIL images ``images[i]``, in
    the checkpoint's chat template (``build_prompt``), left-padded as the processor pads. A base
    with its own chat template gets each prompt's own images and no special tokens beyond those
    its template writes (its processor's ``apply_chat_template`` tokenises so; training too)."""
    images = [[im.convert("RGB") for im in ims] for ims in images]
    flat = [im for ims in images for im in ims]
    prompts = [
        build_prompt(processor, q, len(ims), model_type)
        for q, ims in zip(questions, images, strict=True)
    ]
    if is_llava_layout(model_type):
        # The processor shapes them as training did (load_checkpoint).
        return processor(images=flat or None, text=prompts, padding=True, return_tensors="pt")
    return processor(
        images=images if flat else None,
        text=prompts,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    )


def answer(
    model,
    processor,
    questions: Sequence[str],
    images: Sequence[Sequence],
    max_new_tokens: int = 32,
    num_beams: int = 1,
    device: str = "cpu",
    generate_kwargs: dict | None = None,
) -> list[str]:
    """Greedy answers (KV cache) to ``questions``, the i-th about the PIL images ``images[i]``
    (any number, none for text only), shaped by the processor of ``load_checkpoint``.
    ``generate_kwargs`` go to ``model.generate`` as well (e.g. ``min_new_tokens``)."""
    import torch

    tokenizer = processor.tokenizer
    inputs = prompt_inputs(processor, questions, images, model.config.model_type).to(device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            **(generate_kwargs or {}),
        )
    texts = tokenizer.batch_decode(
        output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [printable(t).strip() for t in texts]
