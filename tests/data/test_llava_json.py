import json

import pytest
from PIL import Image

from moetool.data.llava_json import DataError, load_llava_json


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    return tmp_path


def write(folder, samples, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(samples))
    return path


GOOD = {
    "id": "s1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nColour?"},
        {"from": "gpt", "value": "Red."},
    ],
}
TEXT = {
    "id": "t1",
    "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
}


def test_mixes_files_in_order(folder):
    a = write(folder, [GOOD], "a.json")
    b = write(folder, [TEXT, dict(GOOD, id="s2", image=["a.png"])], "b.json")
    samples, skipped = load_llava_json([a, b], folder)
    assert [s.id for s in samples] == ["s1", "t1", "s2"] and not skipped
    assert samples[0].images == (folder / "a.png",) and samples[1].images == ()
    assert samples[2].source == str(b)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (dict(GOOD, image="missing.png"), "image .*missing.png does not exist"),
        (dict(GOOD, conversations=[]), "empty or missing 'conversations'"),
        (
            dict(
                GOOD, conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]
            ),
            "1 turns after the leading gpt turn",
        ),
        (
            dict(
                GOOD,
                conversations=[
                    {"from": "gpt", "value": "x"},
                    {"from": "gpt", "value": "<image>"},
                    {"from": "human", "value": "y"},
                ],
            ),
            "turn 1 is from 'gpt', expected 'human'",
        ),
        (dict(GOOD, conversations=[{"from": "gpt", "value": "<image>"}]), "a single gpt turn"),
        (dict(TEXT, image="a.png"), "1 image\\(s\\) but 0 <image>"),
        (dict(GOOD, conversations=[{"from": "human", "value": "<image>"}]), "ends with a gpt"),
    ],
)
def test_bad_samples_name_file_and_id(folder, sample, message):
    path = write(folder, [GOOD, sample])
    with pytest.raises(DataError, match=message) as info:
        load_llava_json([path], folder)
    assert str(path) in str(info.value) and repr(sample["id"]) in str(info.value)


def test_a_leading_gpt_turn_is_dropped_as_the_official_code_drops_it(folder):
    """LLaVA's ``preprocess`` skips a first turn that is not from the human; so does the
    parser (the sample trains on the rest), and an ``<image>`` in the dropped turn no longer
    counts."""
    opener = {"from": "gpt", "value": "Hello! Ask me about the picture."}
    leading = dict(GOOD, id="lead", conversations=[opener, *GOOD["conversations"]])
    samples, skipped = load_llava_json([write(folder, [leading])], folder)
    assert not skipped and samples[0].turns == (("human", "<image>\nColour?"), ("gpt", "Red."))
    image_in_opener = dict(
        TEXT, id="img", conversations=[{"from": "gpt", "value": "<image>"}, *TEXT["conversations"]]
    )
    image_in_opener["image"] = "a.png"
    with pytest.raises(DataError, match="1 image\\(s\\) but 0 <image>"):
        load_llava_json([write(folder, [image_in_opener])], folder)


def test_skip_mode_counts_bad_samples(folder):
    path = write(folder, [GOOD, dict(GOOD, id="bad", image="missing.png"), TEXT])
    samples, skipped = load_llava_json([path], folder, skip_bad=True)
    assert [s.id for s in samples] == ["s1", "t1"]
    assert len(skipped) == 1 and "'bad'" in skipped[0]


def test_bad_files(folder):
    with pytest.raises(DataError, match="no such data file"):
        load_llava_json([folder / "nope.json"], folder)
    (folder / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="not a readable JSON"):
        load_llava_json([folder / "broken.json"], folder)
    (folder / "obj.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_llava_json([folder / "obj.json"], folder)
