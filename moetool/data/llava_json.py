"""The LLaVA JSON format: ``id``, ``image`` (a path, a list of paths, or absent for text-only)
and ``conversations`` (``from`` human/gpt, ``value`` with ``<image>`` placeholders), read from
one or several files that are mixed into one dataset. A leading gpt turn is dropped, as the
official code drops it.

A sample may instead hold ``messages`` in the form transformers chat templates take: ``role``
user/assistant, ``content`` a string or a list of ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": PATH}`` parts. It is read into the same turns: each image part
becomes an ``<image>`` placeholder on its own line, in place, and its path one of the sample's
images, in order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moetool.data.templates import IMAGE_PLACEHOLDER, TemplateError, conversation_turns


class DataError(ValueError):
    """A bad data file or sample; the message names the file and the sample id."""


@dataclass(frozen=True)
class Sample:
    id: str
    source: str  # the file it came from
    images: tuple[Path, ...]
    turns: tuple[tuple[str, str], ...]

    @property
    def where(self) -> str:
        return f"{self.source}, sample {self.id!r}"


def parse_sample(raw, index: int, file: Path, image_folder: Path) -> Sample:
    """Sample ``index`` of ``file`` as training reads it (a leading gpt turn dropped); a
    ``DataError`` naming file and sample for a malformed one or a missing image."""
    where = f"{file}, sample #{index}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    sample_id = str(raw.get("id", f"#{index}"))
    where = f"{file}, sample {sample_id!r}"
    if "messages" in raw and "conversations" not in raw:
        turns, paths = _message_turns(raw["messages"], where)
    else:
        turns, paths = _conversation_turns(raw, where)
    try:
        turns = conversation_turns(turns)
    except TemplateError as err:
        raise DataError(f"{where}: {err}") from None
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != len(paths):
        raise DataError(
            f"{where}: {len(paths)} image(s) but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s)"
        )
    images = tuple(image_folder / p for p in paths)
    for path in images:
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist")
    return Sample(sample_id, str(file), images, tuple(turns))


def _conversation_turns(raw: dict, where: str) -> tuple[list, list]:
    """The turns and image paths of a LLaVA-style sample (``conversations``, ``image``)."""
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: empty or missing 'conversations'")
    turns = []
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} needs 'from' and a string 'value'")
        turns.append((turn.get("from"), turn["value"]))
    image = raw.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    return turns, paths


ROLES = {"user": "human", "assistant": "gpt"}


def _message_turns(messages, where: str) -> tuple[list, list]:
    """The turns and image paths of a sample in the chat-template form (``messages``)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty or malformed 'messages'")
    turns, paths = [], []
    for j, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(
                f"{where}: message {j} has role {role!r}; expected 'user' or 'assistant'"
            )
        content = message.get("content")
        if isinstance(content, str):
            turns.append((ROLES[role], content))
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: message {j}: 'content' must be a string or a list of parts")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "image" and isinstance(part.get("image", part.get("path")), str):
                pieces.append(IMAGE_PLACEHOLDER)
                paths.append(part.get("image", part.get("path")))
            else:
                raise DataError(
                    f"{where}: message {j}: each part is {{'type': 'text', 'text': ...}} or "
                    f"{{'type': 'image', 'image': PATH}}, got {part!r}"
                )
        turns.append((ROLES[role], "\n".join(pieces)))
    return turns, paths


def read_llava_file(file: str | Path) -> list:
    """The raw samples of one LLaVA-JSON file; a ``DataError`` naming the file when it is
    missing, not JSON, or not a list."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{file}: no such data file") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{file}: not a readable JSON file ({err})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of samples")
    return data


def load_llava_json(
    files: list[str | Path], image_folder: str | Path, skip_bad: bool = False
) -> tuple[list[Sample], list[str]]:
    """All samples of ``files`` in order, and the problems of the samples skipped (with
    ``skip_bad``; otherwise the first bad sample raises ``DataError``)."""
    samples: list[Sample] = []
    skipped: list[str] = []
    folder = Path(image_folder)
    for file in map(Path, files):
        for index, raw in enumerate(read_llava_file(file)):
            try:
                samples.append(parse_sample(raw, index, file, folder))
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append(str(err))
    return samples, skipped
