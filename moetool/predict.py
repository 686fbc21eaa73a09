"""``moetool predict``: one answer from a dense or sparse checkpoint about one image."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


class PredictError(ValueError):
    """A checkpoint or image that cannot be used; the message names it."""


@dataclass(frozen=True)
class Prediction:
    model: str
    image: str | None
    prompt: str
    answer: str
    sparse: bool

    def to_json(self) -> dict:
        return asdict(self)


def predict(
    model: str | Path,
    prompt: str,
    image: str | Path | None = None,
    max_new_tokens: int = 32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> Prediction:
    """Greedy answer of the checkpoint ``model`` to ``prompt`` about ``image`` (none: text
    only), in the checkpoint's chat template and with its image preprocessing; attention as
    trained unless ``attn_implementation`` says otherwise."""
    from PIL import Image, UnidentifiedImageError

    from moetool.models.attention import AttentionUnavailable
    from moetool.models.inference import answer, checkpoint_attention, load_checkpoint

    model, image = Path(model), Path(image) if image is not None else None
    if not (model / "config.json").is_file():
        raise PredictError(f"--model {model}: not a checkpoint directory (no config.json)")
    try:
        attention = checkpoint_attention(model, attn_implementation, device)
    except AttentionUnavailable as err:
        raise PredictError(str(err)) from None
    if not prompt.strip():
        raise PredictError("--prompt is empty")
    images = []
    if image is not None:
        try:
            with Image.open(image) as opened:
                images.append(opened.convert("RGB"))
        except FileNotFoundError:
            raise PredictError(f"--image {image}: no such file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise PredictError(f"--image {image}: not a readable image ({err})") from None
    loaded, processor = load_checkpoint(model, device=device, attn_implementation=attention)
    text = answer(loaded, processor, [prompt], [images], max_new_tokens, device=device)[0]
    sparse = getattr(loaded.config, "moe", None) is not None
    return Prediction(str(model), str(image) if image else None, prompt, text, sparse)
