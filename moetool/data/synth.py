"""Synthetic data: coloured shapes on plain backgrounds, small enough to train a VLM on CPU.

Each image is one background colour with 1..``max_objects`` shapes, each shape alone inside its
own quadrant, so colour, shape, count and position stay readable after downscaling to 32x32.
The same scenes give the LLaVA-JSON files of the three training stages and, from held-out images
only, POPE, GQA, VQAv2 and MMBench style evaluation sets.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from moetool.io import atomic_output_dir

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (245, 225, 40),
    "purple": (130, 50, 170),
    "orange": (240, 120, 10),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# One object per quadrant: large shapes and positions no one can misread.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PLURALS = {"cross": "crosses"}

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    # A fat star (inner radius 0.45) keeps its points visible at 32x32.
    vertices = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = math.pi * i / points - math.pi / 2
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return _fit_unit_square(vertices)


def _fit_unit_square(vertices: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    xs, ys = [x for x, _ in vertices], [y for _, y in vertices]
    return tuple(
        ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
        for x, y in vertices
    )


def _cross(half_arm: float = 0.18) -> tuple[tuple[float, float], ...]:
    a, b = 0.5 - half_arm, 0.5 + half_arm
    points = [(a, 0.0), (b, 0.0), (b, a)]
    # One arm turned a quarter at a time about the centre traces the whole plus.
    for _ in range(3):
        points += [(1 - y, x) for x, y in points[-3:]]
    return tuple(points)


# Outlines in unit coordinates, each filling its bounding box; the circle is drawn as an ellipse.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
    "cross": _cross(),
    "star": _star(),
}


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    image_size: int = 64  # side of the square PNGs, in pixels
    max_objects: int = 3  # each image has 1..max_objects shapes, one per quadrant
    stage1: int = 2000  # caption samples
    stage2: int = 2000  # instruction samples
    stage3: int = 2000  # instruction samples, with multiple choice and more multi-turn
    eval_images: int = 200  # held-out images behind every evaluation set
    colours: tuple[str, ...] = tuple(PALETTE)  # names from PALETTE
    shapes: tuple[str, ...] = SHAPES
    # Question kinds of the instruction stages and their relative weights; () = the default mix.
    # Stage III adds four-option "choice" questions at weight 2 unless the mix names "choice".
    question_mix: tuple[tuple[str, int], ...] = ()
    # Share of stage II and stage III samples that are conversations of several rounds, and
    # the numbers of rounds such a conversation may have (drawn uniformly).
    multi_turn: tuple[float, float] = (0.3, 0.5)
    rounds: tuple[int, ...] = (2, 3)
    # The kinds of object drawn, as "colour shape" names; () = every colour on every shape.
    # A fixed set (each shape in one colour) makes an object name a class, as in COCO.
    objects: tuple[str, ...] = ()
    # False: every training question in the evaluation sets' phrasing ("Is there a ...?").
    vary_phrasing: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 16:
            problems.append(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.max_objects <= len(POSITIONS):
            problems.append(f"max_objects must be in 1..{len(POSITIONS)}, got {self.max_objects}")
        for name in ("stage1", "stage2", "stage3", "eval_images"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, known in (("colours", tuple(PALETTE)), ("shapes", SHAPES)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if unknown:
                problems.append(f"unknown {name} {unknown}; valid: {', '.join(known)}")
            if len(set(values)) != len(values):
                problems.append(f"{name} has duplicates: {values}")
            # Four distinct options are needed for the multiple-choice questions.
            if len(set(values)) < 4:
                problems.append(f"{name} needs at least 4 names, got {len(set(values))}")
        known_kinds = (*_TRAIN_KINDS, "choice")
        for kind, weight in self.question_mix:
            if kind not in known_kinds:
                problems.append(f"question_mix: unknown kind {kind!r}; valid: {known_kinds}")
            elif weight < 0:
                problems.append(f"question_mix: weight of {kind!r} must be >= 0, got {weight}")
        if self.question_mix and not any(w > 0 for k, w in self.question_mix if k != "choice"):
            problems.append("question_mix: a kind other than 'choice' needs a weight > 0")
        if not self.rounds or min(self.rounds) < 1:
            problems.append(f"rounds must be numbers >= 1, got {self.rounds}")
        if len(self.multi_turn) != 2 or not all(0 <= p <= 1 for p in self.multi_turn):
            problems.append(f"multi_turn must be two shares in 0..1, got {self.multi_turn}")
        for name in self.objects:
            colour, _, shape = name.partition(" ")
            if colour not in self.colours or shape not in self.shapes:
                problems.append(f"objects: {name!r} is not '<colour> <shape>' of the config's")
        if self.objects and len(set(self.objects)) < 4:
            problems.append(f"objects needs at least 4 names, got {len(set(self.objects))}")
        if problems:
            raise ValueError("invalid SynthConfig:\n  " + "\n  ".join(problems))

    def object_kinds(self) -> list[tuple[str, str]]:
        """Every (colour, shape) an image may hold, in vocabulary order."""
        if self.objects:
            wanted = {tuple(name.split(" ", 1)) for name in self.objects}
            return [(c, s) for c in self.colours for s in self.shapes if (c, s) in wanted]
        return [(c, s) for c in self.colours for s in self.shapes]

    def mix(self, stage: str) -> dict[str, int]:
        """Question kinds and weights of an instruction stage ("stage2" or "stage3")."""
        if self.question_mix:
            kinds = dict(self.question_mix)
            if stage == "stage2":
                kinds.pop("choice", None)
        else:
            kinds = _TRAIN_KINDS | ({"choice": 2} if stage == "stage3" else {})
        return {kind: weight for kind, weight in kinds.items() if weight > 0}


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 and y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class _Scene:
    image: str
    split: str
    background: str
    objects: tuple[_Object, ...]

    def signature(self) -> tuple:
        return self.background, tuple((o.colour, o.shape, o.position) for o in self.objects)


@dataclass(frozen=True)
class _QA:
    kind: str
    question: str
    answer: str  # lower case; training files capitalise it


def generate(
    out: str | Path,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    also: Callable[[Path, Path], dict[str, int]] | None = None,
) -> dict[str, int]:
    """Write the synthetic dataset into ``out`` and return the number of records per file.

    ``out`` must not exist unless ``overwrite`` (``FileExistsError``); everything is written to
    a temporary sibling that is renamed to ``out`` only when complete — including what
    ``also(tmp, out)`` writes into it (files derived from the world; paths it records should name
    ``out``); its counts join the result. The same config gives byte-identical files.
    """
    config = config or SynthConfig()
    stage_sizes = {"stage1": config.stage1, "stage2": config.stage2, "stage3": config.stage3}
    # Each training image serves about four samples across the three stages.
    train_images = math.ceil(sum(stage_sizes.values()) / 4)

    eval_scenes = _sample_scenes(config, "eval", config.eval_images, _rng(config, "eval"), set())
    held_out = {s.signature() for s in eval_scenes}
    train_scenes = _sample_scenes(config, "train", train_images, _rng(config, "train"), held_out)

    files: dict[str, list] = {
        "annotations.json": [_annotation(s) for s in train_scenes + eval_scenes],
        "stage1.json": _captions(train_scenes, config.stage1, 0, _rng(config, "stage1")),
    }
    offset = config.stage1
    for stage, multi_turn in zip(("stage2", "stage3"), config.multi_turn, strict=True):
        files[f"{stage}.json"] = _instructions(
            stage, train_scenes, stage_sizes[stage], offset, config.mix(stage), multi_turn, config
        )
        offset += stage_sizes[stage]
    all_scenes = train_scenes + eval_scenes
    for category in ("random", "popular", "adversarial"):
        files[f"eval/pope_{category}.json"] = _pope(eval_scenes, all_scenes, category, config)
    files["eval/gqa.json"] = _gqa(eval_scenes, config)
    files["eval/vqav2.json"] = _vqav2(eval_scenes, config)
    files["eval/mmbench.json"] = _mmbench(eval_scenes, config)

    with atomic_output_dir(out, overwrite) as tmp:
        for split in ("train", "eval"):
            (tmp / "images" / split).mkdir(parents=True)
        for scene in all_scenes:
            _draw(scene, config.image_size).save(tmp / scene.image, format="PNG", compress_level=6)
        for name, records in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(records, sort_keys=True, indent=1, ensure_ascii=False)
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        derived = also(tmp, Path(out)) if also is not None else {}

    summary = {"images/train": len(train_scenes), "images/eval": len(eval_scenes)}
    return summary | {name: len(records) for name, records in files.items()} | derived


def _rng(config: SynthConfig, stream: str) -> random.Random:
    # One independent stream per product, so e.g. more stage-1 samples leave the eval sets alone.
    return random.Random(f"moetool.synth:{config.seed}:{stream}")


# --- scenes and pixels ---------------------------------------------------------------------


def _sample_scenes(
    config: SynthConfig, split: str, count: int, rng: random.Random, excluded: set
) -> list[_Scene]:
    scenes = []
    for _ in range(100 * count + 1000):
        if len(scenes) == count:
            return scenes
        scene = _sample_scene(config, f"images/{split}/{split}_{len(scenes):06d}.png", split, rng)
        # Train never repeats an eval layout, even with different sizes and offsets.
        if scene.signature() not in excluded:
            scenes.append(scene)
    if len(scenes) == count:
        return scenes
    raise ValueError(
        "the eval images use up nearly every layout; ask for fewer eval_images or allow more "
        "colours, shapes or objects"
    )


def _sample_scene(config: SynthConfig, image: str, split: str, rng: random.Random) -> _Scene:
    cell = config.image_size // 2
    margin = max(1, cell // 16)
    largest = cell - 2 * margin
    smallest = min(largest, round(0.6 * cell))
    background = rng.choice(config.colours)
    kinds = [(c, s) for c, s in config.object_kinds() if c != background]
    count = min(rng.randint(1, config.max_objects), len(kinds))
    positions = sorted(rng.sample(range(len(POSITIONS)), count))
    objects = []
    for (colour, shape), quadrant in zip(rng.sample(kinds, count), positions, strict=True):
        size = rng.randint(smallest, largest)
        row, column = divmod(quadrant, 2)
        x0 = column * cell + rng.randint(margin, cell - margin - size)
        y0 = row * cell + rng.randint(margin, cell - margin - size)
        bbox = (x0, y0, x0 + size, y0 + size)
        objects.append(_Object(shape, colour, POSITIONS[quadrant], bbox))
    return _Scene(image, split, background, tuple(objects))


def _draw(scene: _Scene, size: int) -> Image.Image:
    # No anti-aliasing: every pixel is exactly the background or one object's colour.
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            side = x1 - x0 - 1
            points = [(round(x0 + u * side), round(y0 + v * side)) for u, v in _OUTLINES[obj.shape]]
            draw.polygon(points, fill=fill)
    return image


def _annotation(scene: _Scene) -> dict[str, Any]:
    objects = [
        {"shape": o.shape, "colour": o.colour, "position": o.position, "bbox": list(o.bbox)}
        for o in scene.objects
    ]
    return {
        "image": scene.image,
        "split": scene.split,
        "background": scene.background,
        "objects": objects,
    }


# --- text ----------------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _listing(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(scene: _Scene, detailed: bool) -> str:
    phrases = [f"{article(o.colour)} {o.name}" for o in scene.objects]
    if detailed:
        phrases = [f"{p} at the {o.position}" for p, o in zip(phrases, scene.objects, strict=True)]
    objects = _listing(phrases)
    background = f"{article(scene.background)} {scene.background} background"
    if detailed:
        return _capitalise(f"{background} with {objects}.")
    return _capitalise(f"{objects} on {background}.")


BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
    "What is in this image?",
)
DETAILED_PROMPTS = (
    "Describe the image in detail.",
    "Describe each shape in the image and where it is.",
    "Give a detailed description of the picture, including positions.",
)

# First phrasing of each is the one the evaluation sets use (VQAv2 and GQA spell "color").
QUESTION_TEMPLATES = {
    "colour": ("What color is the {shape}?", "What colour is the {shape}?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "background": ("What color is the background?", "What colour is the background?"),
    "count_all": ("How many shapes are there?", "How many objects are in the image?"),
    "count_shape": ("How many {plural} are there?", "How many {plural} are in the image?"),
    "count_colour": ("How many {colour} shapes are there?", "How many {colour} objects are there?"),
    "where": ("Where is the {name}?", "In which part of the image is the {name}?"),
    "left_right": ("Is the {name} on the left or the right?",),
    "top_bottom": ("Is the {name} at the top or the bottom?",),
    "exist": (
        "Is there {a} {name} in the image?",
        "Does the image contain {a} {name}?",
        "Can you see {a} {name} in the image?",
    ),
}
# Relative frequency of each question kind in the instruction stages.
_TRAIN_KINDS = {
    "exist": 3,
    "colour": 2,
    "shape": 1,
    "background": 1,
    "count_all": 1,
    "count_shape": 1,
    "count_colour": 1,
    "where": 1,
    "left_right": 1,
    "top_bottom": 1,
}


def _say(kind: str, rng: random.Random | None, **fields: str) -> str:
    templates = QUESTION_TEMPLATES[kind]
    return (templates[0] if rng is None else rng.choice(templates)).format(**fields)


def _candidates(
    kind: str, scene: _Scene, config: SynthConfig, rng: random.Random, vary: bool
) -> list[_QA]:
    # Every question of this kind the scene answers unambiguously.
    phrasing = rng if vary else None
    objects = scene.objects
    shape_counts = Counter(o.shape for o in objects)
    colour_counts = Counter(o.colour for o in objects)
    if kind == "colour":
        return [
            _QA(kind, _say(kind, phrasing, shape=o.shape), o.colour)
            for o in objects
            if shape_counts[o.shape] == 1
        ]
    if kind == "shape":
        return [
            _QA(kind, _say(kind, phrasing, colour=o.colour), o.shape)
            for o in objects
            if colour_counts[o.colour] == 1
        ]
    if kind == "background":
        return [_QA(kind, _say(kind, phrasing), scene.background)]
    if kind == "count_all":
        return [_QA(kind, _say(kind, phrasing), str(len(objects)))]
    if kind == "count_shape":
        return [
            _QA(kind, _say(kind, phrasing, plural=PLURALS.get(s, s + "s")), str(shape_counts[s]))
            for s in config.shapes
        ]
    if kind == "count_colour":
        # The background colour is left out: "0" would be given away by the question itself.
        return [
            _QA(kind, _say(kind, phrasing, colour=c), str(colour_counts[c]))
            for c in config.colours
            if c != scene.background
        ]
    if kind == "where":
        return [_QA(kind, _say(kind, phrasing, name=o.name), o.position) for o in objects]
    if kind in ("left_right", "top_bottom"):
        # "top left" -> "top" for top_bottom, "left" for left_right.
        part = 0 if kind == "top_bottom" else 1
        return [
            _QA(kind, _say(kind, phrasing, name=o.name), o.position.split()[part]) for o in objects
        ]
    if kind == "exist":
        names = [o.name for o in objects]
        asked = names + _negatives(scene, config, rng)
        return [
            _QA(kind, _say(kind, phrasing, a=article(n), name=n), "yes" if n in names else "no")
            for n in asked
        ]
    raise ValueError(f"unknown question kind {kind!r}")


def _topic(qa: _QA) -> str:
    # What a question is about: the object for existence questions (asked in several
    # phrasings), else the question itself.
    if qa.kind == "exist":
        words = qa.question.rstrip("?").split()
        pairs = zip(words, words[1:], strict=False)
        return next(f"exist:{c} {s}" for c, s in pairs if c in PALETTE and s in SHAPES)
    return qa.question


def _negatives(scene: _Scene, config: SynthConfig, rng: random.Random) -> list[str]:
    # One plausible absent object per kind of mistake, so the three come equally often.
    present = {(o.colour, o.shape) for o in scene.objects}
    colours = {c for c, _ in present}
    shapes = {s for _, s in present}
    absent = [
        (c, s) for c, s in config.object_kinds() if c != scene.background and (c, s) not in present
    ]
    if config.objects:  # a fixed set of classes: every absent class is a plausible negative
        return [" ".join(o) for o in absent]
    mistakes = (
        [(c, s) for c, s in absent if s in shapes],  # a present shape in another colour
        [(c, s) for c, s in absent if c in colours],  # a present colour on another shape
        [(c, s) for c, s in absent if c not in colours and s not in shapes],
    )
    return [" ".join(rng.choice(pool)) for pool in mistakes if pool]


def _answer_space(kind: str, config: SynthConfig) -> Sequence[str]:
    # Answers a kind should give equally often; none for counts of one shape or colour, where
    # the images make that impossible (a shape is far more often absent than present twice).
    spaces: dict[str, Sequence[str]] = {
        "colour": config.colours,
        "background": config.colours,
        "shape": config.shapes,
        "where": POSITIONS,
        "left_right": ("left", "right"),
        "top_bottom": ("top", "bottom"),
        "exist": ("yes", "no"),
        "count_all": [str(n) for n in range(1, config.max_objects + 1)],
    }
    return spaces.get(kind, ())


class _Balancer:
    # Keeps each kind's answers as even as the images allow, so a model that ignores the image
    # can do no better than guess.

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.tally: defaultdict[str, Counter] = defaultdict(Counter)

    def least_used(self, kind: str, answers: Sequence[str], rng: random.Random) -> str:
        tally = self.tally[kind]
        least = min(tally[a] for a in answers)
        answer = rng.choice([a for a in answers if tally[a] == least])
        tally[answer] += 1
        return answer

    def pick(
        self, candidates: Sequence[_QA], rng: random.Random, prefix: str = "", skip: bool = True
    ) -> _QA | None:
        # A candidate whose answer is among the least given so far; None when there are none or
        # (skip) when even that answer is well ahead, so the caller asks another kind.
        if not candidates:
            return None
        kind = candidates[0].kind
        tally = self.tally[prefix + kind]
        answers = sorted({c.answer for c in candidates})
        space = _answer_space(kind, self.config)
        # One image often allows one answer only (its background, its count): skip it when due.
        if skip and space and min(tally[a] for a in answers) > min(tally[a] for a in space) + 2:
            return None
        answer = self.least_used(prefix + kind, answers, rng)
        return rng.choice([c for c in candidates if c.answer == answer])


_CHOICE_KINDS = ("colour", "shape", "where", "count_all", "background")


def _choice(
    scene: _Scene,
    config: SynthConfig,
    rng: random.Random,
    balancer: _Balancer,
    vary: bool,
) -> tuple[_QA, list[str], str]:
    # A four-option question: (inner question, options, correct letter).
    kinds = rng.sample(_CHOICE_KINDS, len(_CHOICE_KINDS))
    asked = [_candidates(k, scene, config, rng, vary) for k in kinds]
    asked = [candidates for candidates in asked if candidates]
    qa = next(filter(None, (balancer.pick(c, rng, "choice:") for c in asked)), None)
    qa = qa or balancer.pick(asked[0], rng, "choice:", skip=False)
    answers = _answer_space(qa.kind, config)
    if qa.kind == "count_all":
        answers = [str(n) for n in range(1, max(config.max_objects, 4) + 1)]
    distractors = rng.sample([a for a in answers if a != qa.answer], 3)
    # The correct letter is balanced like any other answer, so "always A" scores 25%.
    correct = LETTERS.index(balancer.least_used("letter", LETTERS, rng))
    options = distractors[:correct] + [qa.answer] + distractors[correct:]
    return qa, [_capitalise(o) for o in options], LETTERS[correct]


# --- training files ------------------------------------------------------------------------


def _turns(rounds: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (question, answer) in enumerate(rounds):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _captions(
    scenes: Sequence[_Scene], count: int, offset: int, rng: random.Random
) -> list[dict[str, Any]]:
    samples = []
    for j in range(count):
        scene = scenes[(offset + j) % len(scenes)]
        detailed = rng.random() < 0.25
        prompt = rng.choice(DETAILED_PROMPTS if detailed else BRIEF_PROMPTS)
        samples.append(
            {
                "id": f"stage1_{j:06d}",
                "image": scene.image,
                "conversations": _turns([(prompt, _caption(scene, detailed))]),
            }
        )
    return samples


def _instructions(
    stage: str,
    scenes: Sequence[_Scene],
    count: int,
    offset: int,
    kinds: dict[str, int],
    multi_turn: float,
    config: SynthConfig,
) -> list[dict[str, Any]]:
    rng = _rng(config, stage)
    balancer = _Balancer(config)
    samples = []
    for j in range(count):
        scene = scenes[(offset + j) % len(scenes)]
        wanted = rng.choice(config.rounds) if rng.random() < multi_turn else 1
        rounds: list[tuple[str, str]] = []
        topics: set[str] = set()
        left = dict(kinds)
        while len(rounds) < wanted and left:
            kind = rng.choices(list(left), weights=list(left.values()))[0]
            if kind != "exist":  # several objects can be asked about, other kinds once
                del left[kind]
            if kind == "choice":
                qa, options, letter = _choice(scene, config, rng, balancer, config.vary_phrasing)
                lines = [qa.question] + [f"{x}. {o}" for x, o in zip(LETTERS, options, strict=True)]
                rounds.append(("\n".join(lines + [LETTER_ANSWER]), letter))
                continue
            candidates = _candidates(kind, scene, config, rng, config.vary_phrasing)
            # Never the same question twice, nor the same object in other words.
            qa = balancer.pick([c for c in candidates if _topic(c) not in topics], rng)
            if qa is None:
                left.pop(kind, None)
                continue
            # Half the questions carry LLaVA-1.5's short-answer hint, as the eval prompts do.
            suffix = "\n" + SHORT_ANSWER if rng.random() < 0.5 else ""
            rounds.append((qa.question + suffix, _capitalise(qa.answer)))
            topics.add(_topic(qa))
        if not rounds:  # every kind was skipped for balance: ask the first that fits anyway
            for kind in kinds:
                candidates = (
                    _candidates(kind, scene, config, rng, config.vary_phrasing)
                    if kind != "choice"
                    else []
                )
                qa = balancer.pick(candidates, rng, skip=False)
                if qa is not None:
                    rounds.append((qa.question, _capitalise(qa.answer)))
                    break
        samples.append(
            {"id": f"{stage}_{j:06d}", "image": scene.image, "conversations": _turns(rounds)}
        )
    return samples


# --- evaluation sets -----------------------------------------------------------------------


def _pope(
    scenes: Sequence[_Scene], all_scenes: Sequence[_Scene], category: str, config: SynthConfig
) -> list[dict[str, Any]]:
    # POPE (Li et al. 2023): per image every present object (yes) and as many absent ones (no):
    # at random, the most frequent in the dataset, or those most like the present ones.
    rng = _rng(config, f"pope_{category}")
    frequency = Counter((o.colour, o.shape) for s in all_scenes for o in s.objects)
    together: Counter = Counter()
    for s in all_scenes:
        for a in s.objects:
            for b in s.objects:
                if a is not b:
                    together[(a.colour, a.shape), (b.colour, b.shape)] += 1
    # Ties in frequency are broken by vocabulary order, so the ranking is fixed.
    ranking = sorted(config.object_kinds(), key=lambda o: -frequency[o])
    records = []
    for scene in scenes:
        present = [(o.colour, o.shape) for o in scene.objects]
        absent = [o for o in ranking if o not in present and o[0] != scene.background]
        # As many absent objects as present ones (with few object kinds, as many as there are).
        k = min(len(present), len(absent))
        if k < len(present):
            present = sorted(rng.sample(present, k))
        if category == "random":
            negatives = rng.sample(sorted(absent), k)
        elif category == "popular":
            negatives = absent[:k]
        else:
            # Most attributes shared with present objects first, then most co-occurring.
            likeness = [_likeness(o, present, together) for o in absent]
            order = sorted(range(len(absent)), key=likeness.__getitem__, reverse=True)
            negatives = [absent[i] for i in order[:k]]
        asked = [(o, "yes") for o in present] + [(o, "no") for o in negatives]
        rng.shuffle(asked)
        for (colour, shape), answer in asked:
            name = f"{colour} {shape}"
            records.append(
                {
                    "question_id": len(records),
                    "image": scene.image,
                    "question": _say("exist", None, a=article(colour), name=name),
                    "answer": answer,
                    "category": category,
                    "object": name,
                }
            )
    return records


def _likeness(
    obj: tuple[str, str], present: Sequence[tuple[str, str]], together: Counter
) -> tuple[int, int]:
    shared = sum(obj[0] == colour or obj[1] == shape for colour, shape in present)
    return shared, sum(together[obj, p] for p in present)


def _short_answer_set(
    scenes: Sequence[_Scene], config: SynthConfig, stream: str, kinds: Sequence[str], per_image: int
) -> list[tuple[_Scene, _QA]]:
    rng = _rng(config, stream)
    balancer = _Balancer(config)
    asked = []
    for scene in scenes:
        picked = []
        for kind in rng.sample(kinds, len(kinds)):
            qa = balancer.pick(_candidates(kind, scene, config, rng, vary=False), rng)
            picked += [(scene, qa)] if qa else []
            if len(picked) == per_image:
                break
        asked += picked
    return asked


def _gqa(scenes: Sequence[_Scene], config: SynthConfig) -> list[dict[str, Any]]:
    # One-word answers only, so no "where" questions.
    kinds = ("colour", "shape", "background", "count_all", "exist", "left_right", "top_bottom")
    return [
        {"question_id": i, "image": scene.image, "question": qa.question, "answer": qa.answer}
        for i, (scene, qa) in enumerate(_short_answer_set(scenes, config, "gqa", kinds, 2))
    ]


_VQA_TYPES = {
    "exist": ("yes/no", "is there a"),
    "count_all": ("number", "how many"),
    "count_shape": ("number", "how many"),
    "count_colour": ("number", "how many"),
    "colour": ("other", "what color is the"),
    "background": ("other", "what color is the"),
    "shape": ("other", "what shape is the"),
    "where": ("other", "where is the"),
}


def _vqav2(scenes: Sequence[_Scene], config: SynthConfig) -> list[dict[str, Any]]:
    asked = _short_answer_set(scenes, config, "vqav2", tuple(_VQA_TYPES), 2)
    return [
        {
            "question_id": i,
            "image": scene.image,
            "question": qa.question,
            "answers": [qa.answer] * 10,
            "answer_type": _VQA_TYPES[qa.kind][0],
            "question_type": _VQA_TYPES[qa.kind][1],
        }
        for i, (scene, qa) in enumerate(asked)
    ]


_MMBENCH_CATEGORIES = {
    "colour": "attribute_recognition",
    "background": "image_scene",
    "shape": "object_recognition",
    "where": "object_localization",
    "count_all": "counting",
}


def _mmbench(scenes: Sequence[_Scene], config: SynthConfig) -> list[dict[str, Any]]:
    rng = _rng(config, "mmbench")
    balancer = _Balancer(config)
    records = []
    for index, scene in enumerate(scenes):
        qa, options, letter = _choice(scene, config, rng, balancer, vary=False)
        records.append(
            {
                "index": index,
                "image": scene.image,
                "question": qa.question,
                "answer": letter,
                "category": _MMBENCH_CATEGORIES[qa.kind],
            }
            | dict(zip(LETTERS, options, strict=True))
        )
    return records
