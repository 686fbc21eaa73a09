import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

from moetool.data.llava_json import DataError, Sample
from moetool.data.preprocess import (
    IGNORE_INDEX,
    Preprocessor,
    collate,
    collate_packed,
    expand_to_square,
    training_image_processor,
)
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


def test_collate_packed_lays_samples_end_to_end_without_padding(processor, image):
    pre = Preprocessor(processor, get_template("qwen"), 16, 512)
    items = [pre.encode(sample(image)), pre.encode(sample()), pre.encode(sample(image))]
    items[2]["pixel_values"] = items[2]["pixel_values"] + 1.0  # tell the two images apart
    lengths = [len(x["input_ids"]) for x in items]
    labels_before = [x["labels"].clone() for x in items]
    batch = collate_packed(items)
    assert set(batch) == {"input_ids", "labels", "position_ids", "pixel_values"}
    assert batch["input_ids"].shape == batch["position_ids"].shape == (1, sum(lengths))
    assert torch.equal(batch["input_ids"][0], torch.cat([x["input_ids"] for x in items]))
    start = 0
    for x, n in zip(items, lengths, strict=True):
        # positions restart at every sample; its first label is masked, the others kept
        assert batch["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, start + 1 : start + n], x["labels"][1:])
        start += n
    # images in sample order (the text-only sample adds none); the inputs are not modified
    assert torch.equal(
        batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]])
    )
    assert all(torch.equal(x["labels"], y) for x, y in zip(items, labels_before, strict=True))


def random_image(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy())


TOWERS = {  # the towers' standard processors, as moetool builds them before padding
    "clip": lambda: CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    "siglip": lambda: SiglipImageProcessor(size={"height": 32, "width": 32}),
}


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("size", [(96, 64), (50, 120), (33, 17), (17, 33), (40, 40)])
def test_padding_processor_equals_expand_to_square_then_the_towers_processor(tower, size):
    """LlavaImageProcessor(do_pad) pads as LLaVA's expand2square (the plain reference), with
    the fill LLaVA uses, tuple(int(255 * m) for m in image_mean), before the same resizing."""
    base = TOWERS[tower]()
    image = random_image(*size)
    padded = training_image_processor(base, "pad")
    assert type(padded).__name__ == "LlavaImageProcessor" and padded.do_pad
    fill = tuple(int(255 * m) for m in base.image_mean)
    reference = base(expand_to_square(image, fill), return_tensors="pt")["pixel_values"]
    assert torch.equal(padded(image, return_tensors="pt")["pixel_values"], reference)
    # Saved and loaded as a checkpoint's processor is, it still pads.
    resize = training_image_processor(padded, "resize")
    assert not resize.do_pad
    plain = base(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(resize(image, return_tensors="pt")["pixel_values"], plain)
    if size[0] != size[1]:
        assert not torch.equal(plain, reference)


def test_preprocessor_pixels_are_its_image_processors(processor, tmp_path):
    path = tmp_path / "wide.png"
    random_image(96, 64).save(path)
    for ratio in ("pad", "resize"):
        pre = Preprocessor(processor, get_template("qwen"), 16, 512, ratio)
        assert bool(pre.image_processor.do_pad) == (ratio == "pad")
        expected = pre.image_processor(Image.open(path).convert("RGB"), return_tensors="pt")
        assert torch.equal(pre.encode(sample(path))["pixel_values"], expected["pixel_values"])


def test_unknown_image_processor_and_aspect_ratio_are_refused(processor):
    with pytest.raises(ValueError, match="expected 'pad' or 'resize'"):
        training_image_processor(processor.image_processor, "crop")
    with pytest.raises(ValueError, match="image processor object"):
        training_image_processor(object(), "pad")
