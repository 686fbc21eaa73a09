"""Samples -> model inputs: images padded or resized, conversations rendered with a template,
``<image>`` expanded to the tower's token count, labels masked except assistant turns (Eq. 8),
truncation, and batch collation (padded, or packed without padding)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from moetool.data.image_processing import training_image_processor
from moetool.data.llava_json import DataError, Sample
from moetool.data.templates import IMAGE_PLACEHOLDER, Template

IGNORE_INDEX = -100


def expand_to_square(image, fill: tuple[int, int, int]):
    """Pad to a square with ``fill`` (LLaVA's ``expand2square``, ``image_aspect_ratio = pad``):
    the plain reference that ``training_image_processor``'s padding is tested against."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# decode_image switches PIL's process-wide LOAD_TRUNCATED_IMAGES off while it reads: one read at
# a time per process (moetool decodes in worker processes, never in threads).
_STRICT_DECODE = threading.Lock()


def decode_image(path):
    """The image at ``path`` fully decoded, in RGB; a ``DataError`` naming it when it is
    unreadable (truncated included, even where a library imported beside moetool switched on
    PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``: lmms-eval's task module does) or over PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``: PIL warns above it and raises
    above twice it; both are errors here)."""
    import warnings

    from PIL import Image, ImageFile

    try:
        with _STRICT_DECODE, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                with Image.open(path) as img:
                    return img.convert("RGB")
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"image {path} is too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken files
        raise DataError(f"image {path} is unreadable ({err})") from None


def label_tokens(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters overlap a trained span, else ``IGNORE_INDEX``:
    one pass over tokens and spans (both in text order; the spans disjoint)."""
    labels = [IGNORE_INDEX] * len(ids)
    j, last_start = 0, 0
    for i, (start, end) in enumerate(offsets):
        if start < last_start:  # offsets that go back (never seen): look from the first span
            j = 0
        last_start = start
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            break
        if end > start and spans[j][0] < end:
            labels[i] = ids[i]
    return labels


@dataclass
class Preprocessor:
    processor: object  # a LlavaProcessor (image processor + tokenizer)
    template: Template
    image_tokens: int  # tokens one image becomes
    max_length: int
    image_aspect_ratio: str = "pad"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def __post_init__(self):
        # The processor the stage's checkpoint carries (train.runner saves this one).
        self.image_processor = training_image_processor(
            self.processor.image_processor, self.image_aspect_ratio
        )

    def load_image(self, sample: Sample, path):
        """The decoded image; the image processor pads or resizes it."""
        try:
            return decode_image(path)
        except DataError as err:
            raise DataError(f"{sample.where}: {err}") from None

    def tokenize(self, sample: Sample) -> tuple[list[int], list[int]]:
        """The whole conversation's token ids and labels (assistant turns only, Eq. 8), each
        ``<image>`` expanded to the tower's tokens; before truncation."""
        text, spans = self.template.render(list(sample.turns))
        # Expand each placeholder into the tower's image tokens, moving the label spans along.
        expansion = IMAGE_PLACEHOLDER * self.image_tokens
        shift, pos = 0, 0
        pieces = []
        new_spans = list(spans)
        while (found := text.find(IMAGE_PLACEHOLDER, pos)) != -1:
            pieces.append(text[pos:found])
            pieces.append(expansion)
            extra = len(expansion) - len(IMAGE_PLACEHOLDER)
            new_spans = [
                (a + extra, b + extra) if a >= found + shift else (a, b) for a, b in new_spans
            ]
            shift += extra
            pos = found + len(IMAGE_PLACEHOLDER)
        pieces.append(text[pos:])
        text = "".join(pieces)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        return ids, label_tokens(ids, enc["offset_mapping"], new_spans)

    def truncate(
        self, sample: Sample, ids: list[int], labels: list[int]
    ) -> tuple[list[int], list[int]]:
        """``ids`` and ``labels`` cut to ``max_length``; a ``DataError`` when the cut goes into
        the image tokens or no label is left."""
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if ids.count(image_id) != self.image_tokens * len(sample.images):
                raise DataError(
                    f"{sample.where}: max_length {self.max_length} cuts into the image tokens"
                )
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"{sample.where}: every label is masked (template "
                f"{self.template.name!r}, max_length {self.max_length}): nothing to "
                "train on"
            )
        return ids, labels

    def encode(self, sample: Sample) -> dict:
        ids, labels = self.truncate(sample, *self.tokenize(sample))
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if sample.images:
            images = [self.load_image(sample, p) for p in sample.images]
            out["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return out


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch; pixel values of every image in order (text-only samples add none)."""
    length = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [x["pixel_values"] for x in batch if "pixel_values" in x]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def collate_packed(batch: list[dict]) -> dict:
    """Pack a batch without padding (``packing = true``): the samples laid end to end in one
    row of ``(1, total tokens)``, never split; ``position_ids`` restart at 0 for each sample, so
    that transformers' attention keeps each sample to itself (a block-diagonal mask for
    sdpa/eager/flex, varlen kernels for flash attention: both derived from the position ids
    when there is no attention mask); each sample's first label is masked, so no label is
    predicted across a boundary (the padded form never predicts a first token either); pixel
    values of every image in sample order, as ``collate``. The loss, gradients and router
    losses equal those of ``collate`` on the same samples."""
    ids = torch.cat([x["input_ids"] for x in batch])
    labels = torch.cat([x["labels"] for x in batch])
    lengths = [len(x["input_ids"]) for x in batch]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])
    out = {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None]}
    pixels = [x["pixel_values"] for x in batch if "pixel_values" in x]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out
