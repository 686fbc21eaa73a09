"""Samples -> model inputs for a whole dense VLM (a recipe's ``model.base``), through the base's own
processor and chat template: the conversation becomes messages with image parts, the template
renders it, the processor expands each image into its tokens and shapes the pixels (dynamic
resolution, tiling) as the published model saw them, and labels are kept on the assistant turns
only (Eq. 8).

Which characters of the rendered text are an assistant turn is read from the template itself:
turn ``i``'s text is what rendering the first ``i + 1`` messages adds to rendering the first
``i`` with the assistant's turn opened (``add_generation_prompt``), up to its end-of-turn token
(whitespace after it is the template's layout, never generated); it must appear, in order, in
the whole conversation's text. The processor reports where it expanded each image placeholder,
which moves those spans onto the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetool.data.llava_json import DataError, Sample
from moetool.data.preprocess import IGNORE_INDEX, decode_image, label_tokens
from moetool.data.templates import IMAGE_PLACEHOLDER, Span

ROLE = {"human": "user", "gpt": "assistant"}
# Keys of the processor's output that are per token (padded in a batch); the rest are the
# images' features. The processor's own bookkeeping is dropped.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
DROPPED_KEYS = ("offset_mapping", "text_replacement_offsets", "attention_mask")


class ChatTemplateError(DataError):
    """The base's chat template renders a conversation so that its assistant turns cannot be
    found in it."""


def sample_messages(turns) -> list[dict]:
    """The turns as chat-template messages: each ``<image>`` placeholder becomes an image part in
    place (a line break next to it, LLaVA's ``<image>\\n``, goes with it), the text between
    placeholders text parts; a turn without images keeps a plain string."""
    messages = []
    for role, text in turns:
        if IMAGE_PLACEHOLDER not in text:
            messages.append({"role": ROLE[role], "content": text})
            continue
        content = []
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"type": "image"})
                piece = piece.removeprefix("\n")
            if i < len(pieces) - 1:
                piece = piece.removesuffix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": ROLE[role], "content": content})
    return messages


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[Span]]:
    """The conversation rendered by ``processor``'s chat template, and the character spans of
    its assistant turns (each up to and including its end-of-turn token). A
    ``ChatTemplateError`` when a turn renders differently inside the whole conversation."""

    def render(upto: int, opened: bool) -> str:
        return processor.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=opened
        )

    text = render(len(messages), False)
    spans: list[Span] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(i, True), render(i + 1, False)
        if not after.startswith(before):
            raise ChatTemplateError(
                f"the chat template does not continue its opened assistant turn {i} "
                f"({before[-40:]!r}) with the answer"
            )
        turn = after[len(before) :].rstrip()
        start = text.find(turn, pos) if turn else pos
        if start < 0:
            raise ChatTemplateError(
                f"the chat template renders assistant turn {i} ({turn[:40]!r}) differently "
                "inside the whole conversation"
            )
        if turn:
            spans.append((start, start + len(turn)))
        pos = start + len(turn)
    return text, spans


def shift_spans(spans: list[Span], replacements: list[dict]) -> list[Span]:
    """``spans`` of the rendered text moved to the text the processor tokenised, in which each
    image placeholder (``span``) became its expansion (``new_span``)."""
    moved = []
    for start, end in spans:
        gained = sum(
            (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
            for r in replacements
            if r["span"][1] <= start
        )
        moved.append((start + gained, end + gained))
    return moved


@dataclass
class ChatPreprocessor:
    """Encodes samples for a whole dense VLM with its own ``processor`` (tokenizer, image
    processor, chat template); ``max_length`` tokens at most."""

    processor: object
    max_length: int

    def features(self, sample: Sample) -> tuple[dict, list[Span], list[dict]]:
        """The processor's output for the whole conversation (lists of one row), the assistant
        spans moved onto the text it tokenised, and where it put each image's expansion."""
        try:
            text, spans = assistant_spans(self.processor, sample_messages(sample.turns))
        except DataError as err:
            raise DataError(f"{sample.where}: {err}") from None
        images = []
        for path in sample.images:
            try:
                images.append(decode_image(path))
            except DataError as err:
                raise DataError(f"{sample.where}: {err}") from None
        out = self.processor(
            text=[text],
            images=[images] if images else None,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=False,  # the template writes them, as apply_chat_template does
            return_tensors="pt",
        )
        found = out.get("text_replacement_offsets")  # a text-only sample's may be an empty tensor
        replacements = found[0] if isinstance(found, list) and found else []
        return out, shift_spans(spans, replacements), replacements

    def encode(self, sample: Sample) -> dict:
        """``input_ids`` and ``labels`` (one row each, assistant turns only), the other per-token
        inputs the processor gives (``mm_token_type_ids``, ``token_type_ids``) and the images'
        features (``pixel_values``, ``image_grid_thw``, ``image_sizes``, …), cut to
        ``max_length``; a ``DataError`` when the cut goes into an image's tokens or no label is
        left."""
        out, spans, replacements = self.features(sample)
        ids = out["input_ids"][0].tolist()
        offsets = [tuple(o) for o in out["offset_mapping"][0].tolist()]
        labels = label_tokens(ids, offsets, spans)
        if len(ids) > self.max_length:
            image_ends = [r["new_span"][1] for r in replacements]
            kept_end = max((end for _, end in offsets[: self.max_length]), default=0)
            if any(end > kept_end for end in image_ends):
                raise DataError(
                    f"{sample.where}: max_length {self.max_length} cuts into the image tokens"
                )
        cut = min(len(ids), self.max_length)
        if all(label == IGNORE_INDEX for label in labels[:cut]):
            raise DataError(
                f"{sample.where}: every label is masked (the base's chat template, max_length "
                f"{self.max_length}): nothing to train on"
            )
        encoded = {"labels": torch.tensor(labels[:cut])}
        for key, value in out.items():
            if key in DROPPED_KEYS or not isinstance(value, torch.Tensor):
                continue
            encoded[key] = value[0, :cut] if key in TOKEN_KEYS else value
        return encoded


def collate_features(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch of ``ChatPreprocessor`` items: per-token inputs padded (``input_ids``
    with ``pad_token_id``, ``labels`` ignored, the rest with 0) with an ``attention_mask``; each
    image feature concatenated along its first axis in sample order, its other axes zero-padded
    to the largest (the processors' own batch padding: tiles, image sizes, images per sample)."""
    length = max(len(x["input_ids"]) for x in batch)
    out = {}
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, x in enumerate(batch):
        mask[i, : len(x["input_ids"])] = 1
    out_keys = dict.fromkeys(k for x in batch for k in x)
    for key in out_keys:
        values = [x.get(key) for x in batch]
        if key == "labels" or key in TOKEN_KEYS:
            fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            rows = torch.full((len(batch), length), fill, dtype=values[0].dtype)
            for i, value in enumerate(values):
                rows[i, : len(value)] = value
            out[key] = rows
            continue
        present = [v for v in values if v is not None]
        shape = [max(v.shape[d] for v in present) for d in range(present[0].dim())]
        padded = []
        for value in present:
            pad = []
            for d in reversed(range(1, value.dim())):
                pad += [0, shape[d] - value.shape[d]]
            padded.append(torch.nn.functional.pad(value, pad) if any(pad) else value)
        out[key] = torch.cat(padded)
    out["attention_mask"] = mask
    return out
