"""The data preflight finds what training would stop on (and what it accepts), sample by sample,
and agrees with the training parser and encoder on every sample."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from moetool.data.check import (
    ERROR_KINDS,
    WARNING_KINDS,
    check_image,
    check_sample,
    check_stage,
    token_stats,
)
from moetool.data.llava_json import DataError, load_llava_json
from moetool.data.pipeline import BadSample, EncodedDataset
from moetool.data.preprocess import Preprocessor, decode_image
from moetool.data.templates import get_template

MAX_LENGTH = 64
IMAGE_TOKENS = 16  # 32 px / patch 8, squared


def png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit all-black PNG of side x side pixels: a few kB on disk for any side."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + bytes((side + 7) // 8)  # filter byte, then the packed pixels
    squeeze = zlib.compressobj(9)
    pixels = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def turns(*pairs):
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


LONG = " ".join(["the red circle is left of the blue square"] * 20)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A stage's data with one of each problem, and the training preprocessor."""
    from moetool.models.build import llava_processor
    from moetool.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("check")
    Image.new("RGB", (40, 30), "red").save(root / "good.png")
    Image.new("RGB", (48, 48), "blue").save(root / "other.png")
    Image.new("RGB", (640, 480), "green").save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    png_bomb(root / "bomb.png", 10_000)  # 1e8 pixels: over PIL's limit (89.5M), under twice it
    png_bomb(root / "huge.png", 20_000)  # 4e8 pixels: over twice the limit
    ask = "<image>\nWhat colour is it?"
    rows = [
        {"id": "good", "image": "good.png", "conversations": turns((ask, "Red."))},
        {"id": "long_answer", "image": "good.png", "conversations": turns((ask, LONG))},
        {"id": "long_question", "image": "other.png", "conversations": turns((ask + LONG, "Red."))},
        {
            "id": "leading_gpt",
            "image": "other.png",
            "conversations": [{"from": "gpt", "value": "Hello!"}, *turns((ask, "Blue."))],
        },
        {"id": "truncated_jpeg", "image": "cut.jpg", "conversations": turns((ask, "Green."))},
        {"id": "bomb", "image": "bomb.png", "conversations": turns((ask, "Black."))},
        {"id": "huge", "image": "huge.png", "conversations": turns((ask, "Black."))},
        {"id": "missing", "image": "nowhere.png", "conversations": turns((ask, "?"))},
        {"id": "image_last", "image": "good.png", "conversations": turns((LONG + ask, "Red."))},
        {"id": "text", "conversations": turns(("Say hi.", "Hi."), ("Again?", "Hi."))},
        {"id": "bomb_again", "image": "bomb.png", "conversations": turns((ask, "Black."))},
        {"id": "odd", "conversations": [{"from": "human", "value": "alone"}]},
        "not an object",
    ]
    a, b = root / "a.json", root / "b.json"
    a.write_text(json.dumps(rows[:7]))
    b.write_text(json.dumps(rows[7:]))
    tokenizer = build_tokenizer(512, "llama3")
    processor = llava_processor("clip", 32, 8, tokenizer)
    pre = Preprocessor(processor, get_template("llama3"), IMAGE_TOKENS, MAX_LENGTH, "pad")
    return root, [a, b], pre


EXPECTED = [  # (file, index, id, severity, kind), in file and sample order
    ("a", 1, "long_answer", "warning", "truncated"),
    ("a", 2, "long_question", "error", "all_labels_masked"),
    ("a", 3, "leading_gpt", "warning", "leading_gpt_turn"),
    ("a", 4, "truncated_jpeg", "error", "unreadable_image"),
    ("a", 5, "bomb", "error", "image_too_large"),
    ("a", 6, "huge", "error", "image_too_large"),
    ("b", 0, "missing", "error", "missing_image"),
    ("b", 1, "image_last", "error", "image_tokens_cut"),
    ("b", 3, "bomb_again", "error", "image_too_large"),
    ("b", 4, "odd", "error", "malformed"),
    ("b", 5, None, "error", "malformed"),
]


def test_the_bombs_are_real(tmp_path):
    """Small files whose header declares more pixels than PIL's default limit."""
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    bomb = png_bomb(tmp_path / "b.png", 10_000)
    assert bomb.stat().st_size < 50_000
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(bomb) as img:
            assert img.size == (10_000, 10_000) and img.mode == "1"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_every_problem_is_named_in_order(world):
    root, files, pre = world
    report = check_stage("instruct", files, root, pre)
    found = [(Path(p.file).stem, p.index, p.id, p.severity, p.kind) for p in report.problems]
    assert found == EXPECTED
    for problem in report.problems:
        assert problem.file in problem.message
        if problem.id is not None:
            assert repr(problem.id) in problem.message
    assert report.samples == 13 and report.good == 4  # good, long_answer, leading_gpt, text
    assert (report.with_image, report.text_only) == (9, 1)  # of the 11 that parse
    # good.png, other.png, cut.jpg, bomb.png, huge.png: each decoded once.
    assert report.images == 5
    assert report.counts("error") == {
        "malformed": 2,
        "missing_image": 1,
        "unreadable_image": 1,
        "image_too_large": 3,
        "image_tokens_cut": 1,
        "all_labels_masked": 1,
    }
    assert report.counts("warning") == {"truncated": 1, "leading_gpt_turn": 1}
    assert report.verdict(skip_bad_samples=False) == "stop"
    assert report.verdict(skip_bad_samples=True) == "skip"


def test_agrees_with_what_training_reads(world):
    """A sample is bad for the check exactly when training's parser skips it or training's
    dataset cannot encode it, and a sample's length is what training's encoder gives (image
    tokens included) before the cut."""
    root, files, pre = world
    report = check_stage("instruct", files, root, pre)
    samples, skipped = load_llava_json(files, root, skip_bad=True)
    items = [EncodedDataset(samples, pre)[i] for i in range(len(samples))]
    trained = {
        s.id for s, item in zip(samples, items, strict=True) if not isinstance(item, BadSample)
    }
    bad_for_check = {p.id for p in report.problems if p.severity == "error"}
    assert report.bad == len(skipped) + len(samples) - len(trained) == 9
    assert trained == {s.id for s in samples} - bad_for_check
    for sample, item in zip(samples, items, strict=True):
        check = check_sample(
            sample_raw(files, sample), sample_index(files, sample), Path(sample.source), root, pre
        )
        if isinstance(item, BadSample):
            continue
        if sample.id == "long_answer":
            assert check.length > MAX_LENGTH == len(item["input_ids"])
        else:
            assert check.length == len(item["input_ids"])


def sample_raw(files, sample):
    return json.loads(Path(sample.source).read_text())[sample_index(files, sample)]


def sample_index(files, sample):
    rows = json.loads(Path(sample.source).read_text())
    return next(i for i, r in enumerate(rows) if isinstance(r, dict) and r.get("id") == sample.id)


def test_workers_give_the_same_report_in_the_same_order(world):
    root, files, pre = world
    alone = check_stage("instruct", files, root, pre, workers=0)
    seen = []
    pooled = check_stage(
        "instruct",
        files,
        root,
        pre,
        workers=2,
        progress=lambda phase, done, total: seen.append((phase, done, total)),
        sample_chunk=2,
        image_chunk=1,
    )
    assert pooled.problems == alone.problems
    assert (pooled.good, pooled.images, pooled.tokens) == (alone.good, alone.images, alone.tokens)
    assert ("instruct: samples", 13, 13) in seen and ("instruct: images", 5, 5) in seen


def test_decompression_bomb_warning_is_an_error_in_training_too(world):
    root, _, _ = world
    for name in ("bomb.png", "huge.png"):
        with pytest.raises(DataError, match="is too large"):
            decode_image(root / name)
        assert "is too large" in check_image(root / name)
    assert "is unreadable" in check_image(root / "cut.jpg")
    assert check_image(root / "full.jpg") is None
    assert decode_image(root / "good.png").size == (40, 30)


def test_unreadable_files_raise(world):
    root, files, pre = world
    with pytest.raises(DataError, match="no such data file"):
        check_stage("instruct", [root / "nope.json"], root, pre)
    (root / "obj.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        check_stage("instruct", [root / "obj.json"], root, pre)


def test_token_stats():
    assert token_stats([]) is None
    assert token_stats([5, 1, 3]) == {"min": 1, "median": 3, "p95": 5, "max": 5}
    lengths = list(range(1, 101))
    assert token_stats(lengths) == {"min": 1, "median": 50.5, "p95": 95, "max": 100}


def test_nothing_good_stops_even_when_skipping(world):
    root, _, pre = world
    only_bad = root / "bad.json"
    only_bad.write_text(json.dumps([{"id": "m", "image": "x.png", "conversations": []}]))
    report = check_stage("instruct", [only_bad], root, pre)
    assert report.good == 0 and report.verdict(skip_bad_samples=True) == "stop"


# The command: a tiny recipe pointed (with --set) at synthetic data with bad samples added.

SCRIPT = shutil.which("moetool", path=str(Path(sys.executable).parent)) or shutil.which("moetool")


def data_check(*args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [SCRIPT, "data", "check", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic world's stage II data, with a truncated JPEG, a decompression bomb, a
    missing image and a leading gpt turn appended."""
    from moetool.data.synth import SynthConfig
    from moetool.eval.datasets import synthesize_world

    root = tmp_path_factory.mktemp("world") / "data"
    config = SynthConfig(seed=0, image_size=32, stage1=6, stage2=6, stage3=6, eval_images=4)
    synthesize_world(root, config)
    Image.new("RGB", (640, 480), "green").save(root / "full.jpg")
    whole = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    png_bomb(root / "bomb.png", 10_000)
    stage2 = json.loads((root / "stage2.json").read_text())
    qa = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Shapes."}]
    stage2 += [
        {"id": "cut_jpeg", "image": "cut.jpg", "conversations": qa},
        {"id": "the_bomb", "image": "bomb.png", "conversations": qa},
        {"id": "lost", "image": "lost.png", "conversations": qa},
        {
            "id": "opened_by_gpt",
            "image": stage2[0]["image"],
            "conversations": [{"from": "gpt", "value": "Hi!"}, *qa],
        },
    ]
    (root / "bad2.json").write_text(json.dumps(stage2))
    return root


def where(root):
    return ["--set", f"data.root={root}", "--set", f"data.image_folder={root}"]


def test_bad_samples_stop_the_run_and_are_named(data):
    bad = ["--set", 'stages.instruct.data=["bad2.json"]']
    proc = data_check("tiny/llama", *where(data), *bad, "--stage", "instruct")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: stage instruct would stop on its data (3 bad samples)")
    for name in ("'cut_jpeg'", "'the_bomb'", "'lost'"):
        assert name in proc.stderr
    assert "opened_by_gpt" not in proc.stderr  # accepted: a warning
    assert "1 leading gpt turn" in proc.stdout and "instruct" in proc.stdout

    report = json.loads(data_check("tiny/llama", *where(data), *bad, "--json").stdout)
    assert report["exit_code"] == 1 and set(report["stages"]) == {
        "pretrain",
        "instruct",
        "moe_tune",
    }
    instruct = report["stages"]["instruct"]
    assert instruct["verdict"] == "stop" and (instruct["samples"], instruct["good"]) == (10, 7)
    assert instruct["errors"] == {"missing_image": 1, "unreadable_image": 1, "image_too_large": 1}
    assert instruct["warnings"] == {"leading_gpt_turn": 1}
    assert report["stages"]["pretrain"]["verdict"] == "ok"
    kinds = {(p["stage"], p["id"], p["kind"]) for p in report["problems"]}
    assert kinds == {
        ("instruct", "cut_jpeg", "unreadable_image"),
        ("instruct", "the_bomb", "image_too_large"),
        ("instruct", "lost", "missing_image"),
        ("instruct", "opened_by_gpt", "leading_gpt_turn"),
    }
    assert all(p["kind"] in ERROR_KINDS + WARNING_KINDS for p in report["problems"])

    skipping = data_check(
        "tiny/llama",
        *where(data),
        *bad,
        "--set",
        "data.skip_bad_samples=true",
        "--stage",
        "instruct",
    )
    assert skipping.returncode == 0, skipping.stderr
    assert "instruct: 3 bad samples would be skipped" in skipping.stdout


def test_clean_data_and_short_max_length(data):
    clean = data_check("tiny/llama", *where(data), "--stage", "moe_tune")
    assert clean.returncode == 0 and "the data would go through" in clean.stdout, clean.stderr
    # max_length 60 (16 image tokens + the llama3 template + the turns) cuts some
    # conversations and leaves others with no answer token.
    short = ["--set", "stages.moe_tune.max_length=60", "--stage", "moe_tune"]
    proc = data_check("tiny/llama", *where(data), *short)
    assert proc.returncode == 1
    assert "truncated" in proc.stdout and "all labels masked" in proc.stdout
    assert "every label is masked (template 'llama3', max_length 60)" in proc.stderr
    report = json.loads(data_check("tiny/llama", *where(data), *short, "--json").stdout)
    stage = report["stages"]["moe_tune"]
    assert stage["warnings"]["truncated"] > 0 and stage["errors"]["all_labels_masked"] > 0
    assert stage["good"] + stage["errors"]["all_labels_masked"] == stage["samples"] == 6
    assert stage["tokens"]["max"] > 60 and stage["image_tokens"] == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "finetune"], "--stage 'finetune': no such stage"),
        (["--set", 'stages.instruct.data=["nope.json"]'], "nope.json: no such data file"),
        (["--set", "moe.top_k=9"], "moe.top_k"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(data, args, message):
    proc = data_check("tiny/llama", *where(data), *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def labels_reference(ids, offsets, spans):
    """The plain rule: a token is trained on when its characters overlap any trained span."""
    return [
        token if end > start and any(start < b and end > a for a, b in spans) else -100
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]


def test_one_pass_labels_equal_the_plain_rule(world):
    import random

    from moetool.data.preprocess import label_tokens

    _, _, pre = world
    rng = random.Random(0)
    for _ in range(300):
        text_length = rng.randint(0, 60)
        cuts = sorted(
            rng.sample(range(text_length + 1), k=2 * min(rng.randint(0, 4), (text_length + 1) // 2))
        )
        spans = list(zip(cuts[::2], cuts[1::2], strict=True))
        offsets, position = [], 0
        while position < text_length:
            step = rng.randint(0, 4)  # empty tokens (step 0) carry no label
            offsets.append((position, min(text_length, position + step)))
            position += max(step, 1)
        ids = list(range(len(offsets)))
        assert label_tokens(ids, offsets, spans) == labels_reference(ids, offsets, spans)
    text, spans = pre.template.render(
        [("human", "<image>\nWhat?"), ("gpt", "Red."), ("human", "And?"), ("gpt", "Blue.")]
    )
    enc = pre.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert label_tokens(ids, offsets, spans) == labels_reference(ids, offsets, spans)
    assert sum(label != -100 for label in label_tokens(ids, offsets, spans)) > 2


def test_a_truncated_image_stays_an_error_whatever_a_library_switched_on(world, monkeypatch):
    """lmms-eval's task module sets PIL's process-wide LOAD_TRUNCATED_IMAGES on import: a
    process that imported it (an eval, a test worker) must still refuse a truncated image, and
    keep the library's setting for its own reads."""
    from PIL import ImageFile

    root, _, _ = world
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="is unreadable"):
        decode_image(root / "cut.jpg")
    assert "is unreadable" in check_image(root / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
