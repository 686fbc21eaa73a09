"""POPE, GQA, VQAv2 and MMBench style evaluation sets, from held-out images only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from moetool.data.synth.questions import Balancer, article, choice, question_candidates, say
from moetool.data.synth.scenes import LETTERS, QA, Scene, SynthConfig, rng_for


def pope_set(
    scenes: Sequence[Scene], all_scenes: Sequence[Scene], category: str, config: SynthConfig
) -> list[dict[str, Any]]:
    # POPE (Li et al. 2023): per image every present object (yes) and as many absent ones (no):
    # at random, the most frequent in the dataset, or those most like the present ones.
    rng = rng_for(config, f"pope_{category}")
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
                    "question": say("exist", None, a=article(colour), name=name),
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
    scenes: Sequence[Scene], config: SynthConfig, stream: str, kinds: Sequence[str], per_image: int
) -> list[tuple[Scene, QA]]:
    rng = rng_for(config, stream)
    balancer = Balancer(config)
    asked = []
    for scene in scenes:
        picked = []
        for kind in rng.sample(kinds, len(kinds)):
            qa = balancer.pick(question_candidates(kind, scene, config, rng, vary=False), rng)
            picked += [(scene, qa)] if qa else []
            if len(picked) == per_image:
                break
        asked += picked
    return asked


def gqa_set(scenes: Sequence[Scene], config: SynthConfig) -> list[dict[str, Any]]:
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


def vqav2_set(scenes: Sequence[Scene], config: SynthConfig) -> list[dict[str, Any]]:
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


def mmbench_set(scenes: Sequence[Scene], config: SynthConfig) -> list[dict[str, Any]]:
    rng = rng_for(config, "mmbench")
    balancer = Balancer(config)
    records = []
    for index, scene in enumerate(scenes):
        qa, options, letter = choice(scene, config, rng, balancer, vary=False)
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
