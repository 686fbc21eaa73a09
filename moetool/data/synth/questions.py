"""Text about scenes: captions, prompts, question templates, answer candidates and the
balancing of answers."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from moetool.data.synth.scenes import (
    LETTERS,
    PALETTE,
    PLURALS,
    POSITIONS,
    QA,
    SHAPES,
    Scene,
    SynthConfig,
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _listing(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, detailed: bool) -> str:
    phrases = [f"{article(o.colour)} {o.name}" for o in scene.objects]
    if detailed:
        phrases = [f"{p} at the {o.position}" for p, o in zip(phrases, scene.objects, strict=True)]
    objects = _listing(phrases)
    background = f"{article(scene.background)} {scene.background} background"
    if detailed:
        return capitalise(f"{background} with {objects}.")
    return capitalise(f"{objects} on {background}.")


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
def say(kind: str, rng: random.Random | None, **fields: str) -> str:
    templates = QUESTION_TEMPLATES[kind]
    return (templates[0] if rng is None else rng.choice(templates)).format(**fields)


def question_candidates(
    kind: str, scene: Scene, config: SynthConfig, rng: random.Random, vary: bool
) -> list[QA]:
    # Every question of this kind the scene answers unambiguously.
    phrasing = rng if vary else None
    objects = scene.objects
    shape_counts = Counter(o.shape for o in objects)
    colour_counts = Counter(o.colour for o in objects)
    if kind == "colour":
        return [
            QA(kind, say(kind, phrasing, shape=o.shape), o.colour)
            for o in objects
            if shape_counts[o.shape] == 1
        ]
    if kind == "shape":
        return [
            QA(kind, say(kind, phrasing, colour=o.colour), o.shape)
            for o in objects
            if colour_counts[o.colour] == 1
        ]
    if kind == "background":
        return [QA(kind, say(kind, phrasing), scene.background)]
    if kind == "count_all":
        return [QA(kind, say(kind, phrasing), str(len(objects)))]
    if kind == "count_shape":
        return [
            QA(kind, say(kind, phrasing, plural=PLURALS.get(s, s + "s")), str(shape_counts[s]))
            for s in config.shapes
        ]
    if kind == "count_colour":
        # The background colour is left out: "0" would be given away by the question itself.
        return [
            QA(kind, say(kind, phrasing, colour=c), str(colour_counts[c]))
            for c in config.colours
            if c != scene.background
        ]
    if kind == "where":
        return [QA(kind, say(kind, phrasing, name=o.name), o.position) for o in objects]
    if kind in ("left_right", "top_bottom"):
        # "top left" -> "top" for top_bottom, "left" for left_right.
        part = 0 if kind == "top_bottom" else 1
        return [
            QA(kind, say(kind, phrasing, name=o.name), o.position.split()[part]) for o in objects
        ]
    if kind == "exist":
        names = [o.name for o in objects]
        asked = names + _negatives(scene, config, rng)
        return [
            QA(kind, say(kind, phrasing, a=article(n), name=n), "yes" if n in names else "no")
            for n in asked
        ]
    raise ValueError(f"unknown question kind {kind!r}")


def topic(qa: QA) -> str:
    # What a question is about: the object for existence questions (asked in several
    # phrasings), else the question itself.
    if qa.kind == "exist":
        words = qa.question.rstrip("?").split()
        pairs = zip(words, words[1:], strict=False)
        return next(f"exist:{c} {s}" for c, s in pairs if c in PALETTE and s in SHAPES)
    return qa.question


def _negatives(scene: Scene, config: SynthConfig, rng: random.Random) -> list[str]:
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


class Balancer:
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
        self, candidates: Sequence[QA], rng: random.Random, prefix: str = "", skip: bool = True
    ) -> QA | None:
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


def choice(
    scene: Scene,
    config: SynthConfig,
    rng: random.Random,
    balancer: Balancer,
    vary: bool,
) -> tuple[QA, list[str], str]:
    # A four-option question: (inner question, options, correct letter).
    kinds = rng.sample(_CHOICE_KINDS, len(_CHOICE_KINDS))
    asked = [question_candidates(k, scene, config, rng, vary) for k in kinds]
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
    return qa, [capitalise(o) for o in options], LETTERS[correct]
