"""The shapes world: colours, shapes, quadrants, the generator's config, scenes and their
pixels."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

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


# Question kinds of the instruction stages and their default weights.
TRAIN_KINDS = {
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
        known_kinds = (*TRAIN_KINDS, "choice")
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
            kinds = TRAIN_KINDS | ({"choice": 2} if stage == "stage3" else {})
        return {kind: weight for kind, weight in kinds.items() if weight > 0}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 and y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: str
    split: str
    background: str
    objects: tuple[SceneObject, ...]

    def signature(self) -> tuple:
        return self.background, tuple((o.colour, o.shape, o.position) for o in self.objects)


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str  # lower case; training files capitalise it


def rng_for(config: SynthConfig, stream: str) -> random.Random:
    # One independent stream per product, so e.g. more stage-1 samples leave the eval sets alone.
    return random.Random(f"moetool.synth:{config.seed}:{stream}")


def sample_scenes(
    config: SynthConfig, split: str, count: int, rng: random.Random, excluded: set
) -> list[Scene]:
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


def _sample_scene(config: SynthConfig, image: str, split: str, rng: random.Random) -> Scene:
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
        objects.append(SceneObject(shape, colour, POSITIONS[quadrant], bbox))
    return Scene(image, split, background, tuple(objects))


def draw_scene(scene: Scene, size: int) -> Image.Image:
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


def scene_annotation(scene: Scene) -> dict[str, Any]:
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
