"""The converted checkpoint's tokenizer (``<image>`` added, the template's specials) and
LLaVA processor."""

from __future__ import annotations

from pathlib import Path

from moetool.convert.backbones import IMAGE_TOKEN, ConvertError


def prepare_tokenizer(path: Path, template_name: str):
    """The base's tokenizer with ``<image>`` added (when missing), a pad token and the chat
    template. Returns (tokenizer, image token id, end-of-turn token id)."""
    from transformers import AutoTokenizer, PretrainedConfig

    from moetool.data.templates import TemplateError, get_template

    try:
        template = get_template(template_name)
    except TemplateError as err:
        raise ConvertError(f"--template: {err}") from None
    try:
        # A blank config: the official config.json names a model type transformers lacks.
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())
    except Exception as err:  # transformers raises many types for "not loadable here"
        raise ConvertError(
            f"{path}: no tokenizer that transformers loads without remote code "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass "
            "--tokenizer DIR with a transformers tokenizer of the same vocabulary "
            "(docs/convert.md names one per base)"
        ) from None
    vocab = tokenizer.get_vocab()
    if template.eos not in vocab:
        raise ConvertError(
            f"{path}: the {template.name!r} template ends turns with {template.eos!r}, which the "
            "tokenizer does not have; pass --template with the base's template"
        )
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # The official training pads with the unknown token (or end of text when there is none).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = template.jinja()
    return (
        tokenizer,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tokenizer.convert_tokens_to_ids(template.eos),
    )


def build_converted_processor(vision_config, tokenizer, strategy: str, vision_dir: Path | None):
    """LLaVA processor: the tower's image processor (from ``vision_dir`` when it has a
    ``preprocessor_config.json``, else the tower's standard one), padding to a square as the
    official training did (``image_aspect_ratio = pad``), and the tokenizer."""
    from transformers import AutoImageProcessor

    from moetool.models.build import llava_processor

    image_processor = None
    if vision_dir is not None and (vision_dir / "preprocessor_config.json").exists():
        image_processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    tower = "clip" if vision_config.model_type == "clip_vision_model" else "siglip"
    return llava_processor(
        tower,
        vision_config.image_size,
        vision_config.patch_size,
        tokenizer,
        strategy,
        image_processor,
    )
