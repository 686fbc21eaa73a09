import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moetool.data.synth import PALETTE, POSITIONS, SHORT_ANSWER, SynthConfig, generate

SMALL = SynthConfig(seed=3, image_size=32, stage1=40, stage2=60, stage3=60, eval_images=30)
CONFIG = SynthConfig(seed=7, image_size=64, stage1=80, stage2=400, stage3=400, eval_images=80)
STAGES = ("stage1.json", "stage2.json", "stage3.json")
POPE = ("random", "popular", "adversarial")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = generate(out, CONFIG)
    files = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    annotations = {a["image"]: a for a in files["annotations.json"]}
    return out, summary, files, annotations


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- a reading of the questions independent of the generator ---------------------------------

SINGULAR = {"crosses": "cross"} | {s + "s": s for s in CONFIG.shapes if s != "cross"}
QUESTIONS = [
    ("background", r"What colou?r is the background\?"),
    ("colour", r"What colou?r is the (?P<shape>\w+)\?"),
    ("shape", r"What shape is the (?P<colour>\w+) object\?"),
    ("shape", r"Which shape is (?P<colour>\w+)\?"),
    ("count_all", r"How many (?:shapes|objects) are (?:there|in the image)\?"),
    ("count_colour", r"How many (?P<colour>\w+) (?:shapes|objects) are there\?"),
    ("count_shape", r"How many (?P<plural>\w+) are (?:there|in the image)\?"),
    ("where", r"(?:Where is|In which part of the image is) the (?P<colour>\w+) (?P<shape>\w+)\?"),
    ("left_right", r"Is the (?P<colour>\w+) (?P<shape>\w+) on the left or the right\?"),
    ("top_bottom", r"Is the (?P<colour>\w+) (?P<shape>\w+) at the top or the bottom\?"),
    (
        "exist",
        r"(?:Is there|Does the image contain|Can you see) (?P<article>an?) (?P<colour>\w+) "
        r"(?P<shape>\w+)(?: in the image)?\?",
    ),
]


def expected_answer(question: str, annotation: dict) -> tuple[str, str]:
    """(kind, lower-case answer) of a question, worked out from the annotation alone."""
    objects = annotation["objects"]
    matches = [(kind, m) for kind, pattern in QUESTIONS if (m := re.fullmatch(pattern, question))]
    assert matches, f"unknown question {question!r}"
    kind, match = matches[0]
    q = match.groupdict()
    if kind == "background":
        return kind, annotation["background"]
    if kind == "colour":
        (obj,) = [o for o in objects if o["shape"] == q["shape"]]  # asked only when unambiguous
        return kind, obj["colour"]
    if kind == "shape":
        (obj,) = [o for o in objects if o["colour"] == q["colour"]]
        return kind, obj["shape"]
    if kind == "count_all":
        return kind, str(len(objects))
    if kind == "count_colour":
        return kind, str(sum(o["colour"] == q["colour"] for o in objects))
    if kind == "count_shape":
        return kind, str(sum(o["shape"] == SINGULAR[q["plural"]] for o in objects))
    present = [o for o in objects if (o["colour"], o["shape"]) == (q["colour"], q["shape"])]
    if kind == "exist":
        assert q["article"] == ("an" if q["colour"][0] in "aeiou" else "a"), question
        return kind, "yes" if present else "no"
    (obj,) = present
    part = {"where": slice(None), "top_bottom": slice(0, 1), "left_right": slice(1, 2)}[kind]
    return kind, " ".join(obj["position"].split()[part])


def read_human_turn(text: str) -> tuple[str, dict[str, str]]:
    """Question and, for multiple choice, its options by letter."""
    question, *rest = text.removeprefix("<image>\n").split("\n")
    if rest in ([], [SHORT_ANSWER]):
        return question, {}
    assert rest[-1] == "Answer with the option's letter from the given choices directly."
    options = dict(line.split(". ", 1) for line in rest[:-1])
    assert list(options) == ["A", "B", "C", "D"]
    return question, options


# --- a reference rasteriser for the shapes --------------------------------------------------


def star_outline() -> np.ndarray:
    angles = np.pi * np.arange(10) / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return (points - points.min(0)) / (points.max(0) - points.min(0))


def inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def reference_masks(size: int) -> dict[str, np.ndarray]:
    # Pixel centres in the unit square of the bounding box.
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    return {
        "circle": du**2 + dv**2 <= 0.25,
        "square": np.ones_like(u, dtype=bool),
        "triangle": v >= 2 * du,
        "diamond": du + dv <= 0.5,
        "cross": np.minimum(du, dv) <= 0.18,
        "star": inside_polygon(u, v, star_outline()),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# --- tests ----------------------------------------------------------------------------------


def test_same_config_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, SMALL)
    generate(second, SMALL)
    generate(other, SynthConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    reference = all_bytes(first)
    assert reference == all_bytes(second)
    different = all_bytes(other)
    assert reference.keys() == different.keys()
    assert reference["annotations.json"] != different["annotations.json"]
    assert sum(reference[k] != different[k] for k in reference if k.endswith(".png")) > 40


def test_an_existing_output_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate(out, SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    real_save = Image.Image.save
    saved = []

    def failing_save(self, *args, **kwargs):
        if len(saved) == 5:
            raise OSError("disk full")
        saved.append(args[0])
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "data", SMALL)
    assert len(saved) == 5
    assert list(tmp_path.iterdir()) == []


def test_invalid_configs_are_refused_with_every_problem_named():
    with pytest.raises(ValueError) as error:
        SynthConfig(image_size=8, max_objects=5, stage2=-1, colours=("red", "pink", "red"))
    message = str(error.value)
    for problem in ("image_size", "max_objects", "stage2", "pink", "duplicates", "at least 4"):
        assert problem in message
    with pytest.raises(ValueError, match="hexagon"):
        SynthConfig(shapes=("circle", "square", "triangle", "hexagon"))


def test_the_palette_colours_are_far_apart():
    rgb = np.array([PALETTE[c] for c in SynthConfig().colours], dtype=float)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(distances) > 80


def test_summary_counts_every_file(data):
    out, summary, files, annotations = data
    for name, records in files.items():
        assert summary[name] == len(records), name
    for split in ("train", "eval"):
        images = sorted(p.name for p in (out / "images" / split).iterdir())
        assert summary[f"images/{split}"] == len(images)
        assert images == [f"{split}_{i:06d}.png" for i in range(len(images))]
    assert summary["images/eval"] == CONFIG.eval_images
    # Images are reused: each serves about four training samples.
    train_samples = CONFIG.stage1 + CONFIG.stage2 + CONFIG.stage3
    assert summary["images/train"] == math.ceil(train_samples / 4)
    assert summary["stage2.json"] == CONFIG.stage2
    assert len(annotations) == summary["images/train"] + summary["images/eval"]


def test_annotations_agree_with_the_pixels(data):
    out, _, _, annotations = data
    size = CONFIG.image_size
    half = size // 2
    counts = Counter()
    for annotation in annotations.values():
        pixels = np.asarray(Image.open(out / annotation["image"]).convert("RGB"))
        assert pixels.shape == (size, size, 3)
        background = np.array(PALETTE[annotation["background"]])
        for y, x in itertools.product((0, size - 1), repeat=2):
            assert (pixels[y, x] == background).all()
        objects = annotation["objects"]
        assert 1 <= len(objects) <= CONFIG.max_objects
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        assert len({o["position"] for o in objects}) == len(objects)
        outside = np.ones((size, size), dtype=bool)
        for obj in objects:
            assert obj["colour"] != annotation["background"]
            x0, y0, x1, y1 = obj["bbox"]
            # Wholly inside the quadrant it is named after, so its position is unmistakable.
            vertical, horizontal = obj["position"].split()
            assert (y1 <= half) if vertical == "top" else (y0 >= half)
            assert (x1 <= half) if horizontal == "left" else (x0 >= half)
            assert x1 - x0 == y1 - y0 >= 0.5 * half
            outside[y0:y1, x0:x1] = False
            box = pixels[y0:y1, x0:x1]
            colour = np.array(PALETTE[obj["colour"]])
            assert (box[(y1 - y0) // 2, (x1 - x0) // 2] == colour).all()
            mask = (box == colour).all(-1)
            assert (mask | (box == background).all(-1)).all()
            # The drawn shape is the annotated one: it matches that reference best, and well.
            scores = {s: iou(mask, ref) for s, ref in reference_masks(x1 - x0).items()}
            assert max(scores, key=scores.get) == obj["shape"], scores
            assert scores[obj["shape"]] > 0.8, scores
            counts[obj["shape"]] += 1
        assert (pixels[outside] == background).all()
    assert set(counts) == set(CONFIG.shapes)


def test_train_and_eval_images_are_disjoint(data):
    out, _, files, annotations = data
    splits = {image: a["split"] for image, a in annotations.items()}
    assert all(image.startswith(f"images/{split}/") for image, split in splits.items())
    train = {i for i, s in splits.items() if s == "train"}
    evaluation = {i for i, s in splits.items() if s == "eval"}
    for name, records in files.items():
        if name in STAGES:
            assert {r["image"] for r in records} <= train, name
        elif name.startswith("eval/"):
            assert {r["image"] for r in records} == evaluation, name
    pngs = Counter((out / image).read_bytes() for image in annotations)
    assert max(pngs.values()) == 1

    def layout(a):
        return a["background"], sorted(
            (o["colour"], o["shape"], o["position"]) for o in a["objects"]
        )

    train_layouts = [layout(annotations[i]) for i in train]
    assert not [
        layout(annotations[i]) for i in evaluation if layout(annotations[i]) in train_layouts
    ]


def test_llava_samples_are_well_formed(data):
    out, _, files, _ = data
    ids = []
    for name in STAGES:
        rounds = Counter()
        for sample in files[name]:
            ids.append(sample["id"])
            assert (out / sample["image"]).is_file()
            turns = sample["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert all(t["value"].strip() for t in turns)
            rounds[len(turns) // 2] += 1
        if name == "stage1.json":
            assert set(rounds) == {1}
        else:
            assert set(rounds) == {1, 2, 3}, name
            assert 0.15 < (rounds[2] + rounds[3]) / rounds.total() < 0.65
    assert len(ids) == len(set(ids))


def test_captions_name_exactly_the_objects(data):
    _, _, files, annotations = data
    thing = r"an? (\w+) (\w+)(?: at the (top left|top right|bottom left|bottom right))?"
    styles = Counter()
    for sample in files["stage1.json"]:
        annotation = annotations[sample["image"]]
        caption = sample["conversations"][1]["value"]
        brief = re.fullmatch(r"(.+) on an? (\w+) background\.", caption, flags=re.I)
        detailed = re.fullmatch(r"An? (\w+) background with (.+)\.", caption)
        if brief:
            listing, background = brief.groups()
        else:
            background, listing = detailed.groups()
        styles["brief" if brief else "detailed"] += 1
        assert background == annotation["background"]
        named = [
            re.fullmatch(thing, p, flags=re.I).groups() for p in re.split(r", | and ", listing)
        ]
        truth = [(o["colour"], o["shape"]) for o in annotation["objects"]]
        assert [(c.lower(), s) for c, s, _ in named] == truth, caption
        if detailed:
            assert [p for *_, p in named] == [o["position"] for o in annotation["objects"]]
    assert min(styles.values()) > 5
    prompts = {s["conversations"][0]["value"] for s in files["stage1.json"]}
    assert len(prompts) > 5


def test_every_training_answer_follows_from_the_image(data):
    _, _, files, annotations = data
    kinds = {"stage2.json": Counter(), "stage3.json": Counter()}
    for name, seen in kinds.items():
        for sample in files[name]:
            annotation = annotations[sample["image"]]
            turns = sample["conversations"]
            for human, gpt in zip(turns[::2], turns[1::2], strict=True):
                question, options = read_human_turn(human["value"])
                kind, answer = expected_answer(question, annotation)
                if options:
                    assert options[gpt["value"]].lower() == answer, (question, options)
                    assert len({o.lower() for o in options.values()}) == 4
                    kind = "choice"
                else:
                    assert gpt["value"].lower() == answer, (question, gpt["value"])
                seen[kind] += 1
    every_kind = {kind for kind, _ in QUESTIONS}
    assert set(kinds["stage2.json"]) == every_kind
    assert set(kinds["stage3.json"]) == every_kind | {"choice"}


def test_yes_no_questions_are_balanced_with_plausible_negatives(data):
    _, _, files, annotations = data
    for name in ("stage2.json", "stage3.json"):
        answers, mistakes = Counter(), Counter()
        for sample in files[name]:
            annotation = annotations[sample["image"]]
            turns = sample["conversations"]
            for human, gpt in zip(turns[::2], turns[1::2], strict=True):
                question, _ = read_human_turn(human["value"])
                match = re.fullmatch(QUESTIONS[-1][1], question)
                if not match:
                    continue
                answers[gpt["value"]] += 1
                if gpt["value"] == "No":
                    colour, shape = match["colour"], match["shape"]
                    assert colour != annotation["background"]
                    shares_colour = any(o["colour"] == colour for o in annotation["objects"])
                    shares_shape = any(o["shape"] == shape for o in annotation["objects"])
                    mistakes[(shares_colour, shares_shape)] += 1
        assert set(answers) == {"Yes", "No"}
        assert abs(answers["Yes"] - answers["No"]) <= 1, (name, answers)
        # Three kinds of negative: another colour, another shape, something wholly absent.
        wrong_colour = mistakes[(False, True)] + mistakes[(True, True)]
        wrong_shape = mistakes[(True, False)] + mistakes[(True, True)]
        for share in (wrong_colour, wrong_shape, mistakes[(False, False)]):
            assert share > 0.2 * answers["No"], (name, mistakes)


def test_answers_do_not_follow_from_the_question_alone(data):
    _, _, files, annotations = data
    by_kind: dict[str, Counter] = {}
    for name in ("stage2.json", "stage3.json"):
        for sample in files[name]:
            for human in sample["conversations"][::2]:
                question, options = read_human_turn(human["value"])
                kind, answer = expected_answer(question, annotations[sample["image"]])
                by_kind.setdefault(kind, Counter())[answer] += 1
    vocabulary = {
        "colour": CONFIG.colours,
        "background": CONFIG.colours,
        "shape": CONFIG.shapes,
        "where": POSITIONS,
        "left_right": ("left", "right"),
        "top_bottom": ("top", "bottom"),
        "exist": ("yes", "no"),
        "count_all": [str(n) for n in range(1, CONFIG.max_objects + 1)],
    }
    for kind, values in vocabulary.items():
        answers = by_kind[kind]
        assert set(answers) == set(values), kind
        # Guessing the commonest answer does barely better than chance.
        assert max(answers.values()) / answers.total() < 1.5 / len(values), (kind, answers)
    # Counting one shape or colour: 0 and 1 come first, but never most of the time.
    for kind in ("count_shape", "count_colour"):
        assert max(by_kind[kind].values()) / by_kind[kind].total() < 0.5, by_kind[kind]


def pope_by_image(records: list) -> dict[str, dict[str, set]]:
    asked: dict[str, dict[str, set]] = {}
    for r in records:
        asked.setdefault(r["image"], {"yes": set(), "no": set()})[r["answer"]].add(r["object"])
    return asked


def test_pope_asks_about_present_and_absent_objects(data):
    _, _, files, annotations = data
    for category in POPE:
        records = files[f"eval/pope_{category}.json"]
        assert [r["question_id"] for r in records] == list(range(len(records)))
        assert {r["category"] for r in records} == {category}
        for r in records:
            article = "an" if r["object"][0] in "aeiou" else "a"
            assert r["question"] == f"Is there {article} {r['object']} in the image?"
        answers = Counter(r["answer"] for r in records)
        assert answers["yes"] == answers["no"] and set(answers) == {"yes", "no"}
        for image, asked in pope_by_image(records).items():
            annotation = annotations[image]
            present = {f"{o['colour']} {o['shape']}" for o in annotation["objects"]}
            assert asked["yes"] == present
            assert len(asked["no"]) == len(present)
            assert not asked["no"] & present
            assert all(o.split()[0] != annotation["background"] for o in asked["no"])


def test_pope_categories_pick_negatives_as_defined(data):
    _, _, files, annotations = data
    negatives = {c: pope_by_image(files[f"eval/pope_{c}.json"]) for c in POPE}

    def share(category):
        hits = total = 0
        for image, asked in negatives[category].items():
            objects = annotations[image]["objects"]
            for name in asked["no"]:
                colour, shape = name.split()
                hits += any(o["colour"] == colour or o["shape"] == shape for o in objects)
                total += 1
        return hits / total

    # Adversarial negatives always look like something in the image; random ones often do not.
    assert share("adversarial") == 1.0
    assert share("random") < 0.85

    # Popular negatives are the most frequent objects of the whole dataset that are absent.
    frequency = Counter(
        f"{o['colour']} {o['shape']}" for a in annotations.values() for o in a["objects"]
    )
    ranking = sorted(
        (f"{c} {s}" for c in CONFIG.colours for s in CONFIG.shapes), key=lambda o: -frequency[o]
    )
    for image, asked in negatives["popular"].items():
        annotation = annotations[image]
        candidates = [
            o for o in ranking if o not in asked["yes"] and o.split()[0] != annotation["background"]
        ]
        assert asked["no"] == set(candidates[: len(asked["yes"])])

    def variety(category):
        return len(set().union(*(asked["no"] for asked in negatives[category].values())))

    assert variety("popular") < variety("random") / 2
    assert variety("random") > 0.6 * len(CONFIG.colours) * len(CONFIG.shapes)


def test_gqa_and_vqav2_answers_follow_from_the_image(data):
    _, _, files, annotations = data
    gqa = files["eval/gqa.json"]
    assert [r["question_id"] for r in gqa] == list(range(len(gqa)))
    for r in gqa:
        assert set(r) == {"question_id", "image", "question", "answer"}
        assert r["answer"] == expected_answer(r["question"], annotations[r["image"]])[1]
        assert re.fullmatch(r"[a-z0-9]+", r["answer"])
    assert Counter(r["answer"] for r in gqa if r["answer"] in ("yes", "no"))["yes"] > 5

    vqa = files["eval/vqav2.json"]
    types = Counter()
    for r in vqa:
        (answer,) = set(r["answers"])
        assert len(r["answers"]) == 10
        kind, expected = expected_answer(r["question"], annotations[r["image"]])
        assert answer == expected
        answer_type = (
            "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
        )
        assert r["answer_type"] == answer_type
        assert r["question"].lower().startswith(r["question_type"].removesuffix(" a"))
        types[answer_type] += 1
    assert set(types) == {"yes/no", "number", "other"}


def test_mmbench_has_one_right_option_spread_evenly(data):
    _, _, files, annotations = data
    records = files["eval/mmbench.json"]
    assert [r["index"] for r in records] == list(range(len(records)))
    letters = Counter()
    for r in records:
        options = [r[x] for x in "ABCD"]
        assert len(set(options)) == 4
        kind, answer = expected_answer(r["question"], annotations[r["image"]])
        assert r[r["answer"]].lower() == answer
        assert [o.lower() for o in options].count(answer) == 1
        letters[r["answer"]] += 1
    assert set(letters) == set("ABCD")
    assert max(letters.values()) - min(letters.values()) <= 1
    assert len({r["category"] for r in records}) == 5


# --- options the quickstart world uses -------------------------------------------------------

CLASSES = ("red circle", "blue square", "green triangle", "yellow star")
CLASS_WORLD = SynthConfig(
    seed=5,
    image_size=32,
    stage1=20,
    stage2=120,
    stage3=40,
    eval_images=40,
    objects=CLASSES,
    question_mix=(("exist", 6), ("background", 1), ("count_all", 1)),
    multi_turn=(1.0, 0.0),
    rounds=(4,),
)


@pytest.fixture(scope="module")
def class_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("classes") / "data"
    generate(out, CLASS_WORLD)
    files = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    return files, {a["image"]: a for a in files["annotations.json"]}


def test_a_fixed_object_set_is_all_that_is_drawn_or_asked_about(class_world):
    files, annotations = class_world
    drawn = {f"{o['colour']} {o['shape']}" for a in annotations.values() for o in a["objects"]}
    assert drawn == set(CLASSES)
    for category in POPE:
        records = files[f"eval/pope_{category}.json"]
        assert {r["object"] for r in records} <= set(CLASSES)
        answers = Counter(r["answer"] for r in records)
        assert answers["yes"] == answers["no"] > 0
        for image, asked in pope_by_image(records).items():
            present = {f"{o['colour']} {o['shape']}" for o in annotations[image]["objects"]}
            assert asked["yes"] <= present and not asked["no"] & present


def test_question_mix_and_rounds_shape_the_instruction_stages(class_world):
    files, annotations = class_world
    rounds = Counter(len(s["conversations"]) // 2 for s in files["stage2.json"])
    # multi_turn 1.0, rounds (4,): four rounds unless an image runs out of balanced questions
    assert set(rounds) <= {1, 2, 3, 4} and rounds[4] >= 0.8 * len(files["stage2.json"])
    for sample in files["stage2.json"]:
        turns = sample["conversations"]
        questions = [read_human_turn(t["value"])[0] for t in turns[::2]]
        assert len(set(questions)) == len(questions)  # never the same question twice
        kinds = Counter(expected_answer(q, annotations[sample["image"]])[0] for q in questions)
        assert set(kinds) <= {"exist", "background", "count_all"}
        assert kinds["background"] <= 1 and kinds["count_all"] <= 1
    assert all(len(s["conversations"]) == 2 for s in files["stage3.json"])  # multi_turn 0.0


def test_invalid_mix_objects_and_rounds_are_named():
    with pytest.raises(ValueError) as err:
        SynthConfig(
            question_mix=(("smell", 1),),
            objects=("red circle", "pink square"),
            rounds=(0,),
            multi_turn=(1.5, 0.0),
        )
    for text in ("smell", "pink square", "rounds", "multi_turn"):
        assert text in str(err.value)
    with pytest.raises(ValueError, match="other than 'choice'"):
        SynthConfig(question_mix=(("choice", 2), ("exist", 0)))
