"""The image processor that shapes images as a stage's ``image_aspect_ratio`` did, by itself (a
plain ``AutoProcessor`` of the checkpoint then sees the pixels training saw). No torch at import:
upcycle and export rewrite a checkpoint's processor config without it."""

from __future__ import annotations

# Image processors whose resize/crop/normalise settings carry over into a LlavaImageProcessor
# (any backend: a checkpoint's type name loads the default backend through AutoImageProcessor).
IMAGE_PROCESSORS = {
    f"{name}{backend}"
    for name in ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor")
    for backend in ("", "Fast", "Pil")
}


def training_settings(settings: dict, aspect_ratio: str) -> dict | None:
    """The settings (``to_dict()`` / ``preprocessor_config`` form, with ``image_processor_type``)
    of the image processor that shapes images as ``aspect_ratio`` does; None when ``settings``
    already do. "pad": a ``LlavaImageProcessor`` with ``do_pad`` — padded to a square with the
    mean colour, ``tuple(int(255 * m) for m in image_mean)`` as LLaVA's ``expand2square``, then
    the same resize, crop and normalisation; "resize": the same without the padding."""
    if aspect_ratio not in ("pad", "resize"):
        raise ValueError(f"image_aspect_ratio {aspect_ratio!r}: expected 'pad' or 'resize'")
    name = settings.get("image_processor_type")
    if name not in IMAGE_PROCESSORS:
        raise ValueError(
            f"image processor {name}: moetool shapes images with one of "
            f"{', '.join(sorted(IMAGE_PROCESSORS))}"
        )
    pad = aspect_ratio == "pad"
    if bool(settings.get("do_pad")) == pad and (name == "LlavaImageProcessor" or not pad):
        return None
    out = {k: v for k, v in settings.items() if k not in ("processor_class", "do_pad")}
    out["do_center_crop"] = bool(out.get("do_center_crop"))  # SigLIP: no crop
    out["image_processor_type"] = "LlavaImageProcessor"
    out["do_pad"] = pad
    return out


def training_image_processor(image_processor, aspect_ratio: str):
    """``image_processor`` as a stage with ``image_aspect_ratio = aspect_ratio`` shapes images
    (``training_settings``); returned as is when it already does that."""
    from transformers import LlavaImageProcessor

    name = type(image_processor).__name__
    settings = (
        {**image_processor.to_dict(), "image_processor_type": name}
        if name in IMAGE_PROCESSORS
        else {"image_processor_type": name}
    )
    new = training_settings(settings, aspect_ratio)
    if new is None:
        return image_processor
    del new["image_processor_type"]
    return LlavaImageProcessor(**new)
