import pytest
import torch
from PIL import Image

from moetool.data.llava_json import DataError, Sample
from moetool.data.preprocess import IGNORE_INDEX, Preprocessor, collate, expand_to_square
from moetool.data.templates import get_template
from moetool.models.build import build_processor
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_tokenizer


@pytest.fixture(scope="module")
def processor():
    recipe = load_recipe(recipes_root() / "tiny/qwen2.toml")
    return build_processor(recipe.vision, build_tokenizer(512, "qwen"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    return path


def sample(image=None, turns=None):
    turns = turns or (
        ("human", "<image>\nWhat colour is the circle?"),
        ("gpt", "Red."),
        ("human", "And the square?"),
        ("gpt", "Blue."),
    )
    if image is None:
        turns = tuple((r, t.replace("<image>\n", "")) for r, t in turns)
    return Sample("s1", "data.json", () if image is None else (image,), turns)


def test_labels_cover_exactly_the_assistant_turns(processor, image):
    pre = Preprocessor(processor, get_template("qwen"), image_tokens=16, max_length=512)
    out = pre.encode(sample(image))
    ids, labels = out["input_ids"], out["labels"]
    trained = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert trained.replace(" ", "") == "Red.<|endoftext|>Blue.<|endoftext|>"
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 16
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])


def test_text_only_sample_has_no_pixels(processor):
    out = Preprocessor(processor, get_template("qwen"), 16, 512).encode(sample())
    assert "pixel_values" not in out


def test_pad_keeps_the_aspect_ratio_with_the_mean_colour(processor, image):
    padded = expand_to_square(Image.open(image).convert("RGB"), (1, 2, 3))
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((20, 20)) == (255, 0, 0)
    pad = Preprocessor(processor, get_template("qwen"), 16, 512, "pad").encode(sample(image))
    resize = Preprocessor(processor, get_template("qwen"), 16, 512, "resize").encode(sample(image))
    assert not torch.equal(pad["pixel_values"], resize["pixel_values"])


def test_truncation_errors(processor, image):
    with pytest.raises(DataError, match="cuts into the image tokens"):
        Preprocessor(processor, get_template("plain"), 16, 8).encode(sample(image))
    full = Preprocessor(processor, get_template("qwen"), 16, 512).encode(sample(image))
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(DataError, match="sample 's1': every label is masked"):
        Preprocessor(processor, get_template("qwen"), 16, first_label).encode(sample(image))
    kept = Preprocessor(processor, get_template("qwen"), 16, first_label + 1).encode(sample(image))
    assert (kept["labels"] != IGNORE_INDEX).sum() == 1


def test_unreadable_image_names_the_sample(processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="data.json, sample 's1': image .*bad.png is unreadable"):
        Preprocessor(processor, get_template("qwen"), 16, 512).encode(sample(bad))


def test_collate_pads_right_and_stacks_images(processor, image):
    pre = Preprocessor(processor, get_template("qwen"), 16, 512)
    a, b = pre.encode(sample(image)), pre.encode(sample())
    batch = collate([a, b], pad_token_id=processor.tokenizer.pad_token_id)
    n = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    assert batch["attention_mask"][1, n:].sum() == 0 and batch["attention_mask"][1, :n].all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
