"""The LLaVA-JSON files of the three training stages."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from moetool.data.synth.questions import (
    BRIEF_PROMPTS,
    DETAILED_PROMPTS,
    Balancer,
    capitalise,
    caption,
    choice,
    question_candidates,
    topic,
)
from moetool.data.synth.scenes import (
    LETTER_ANSWER,
    LETTERS,
    SHORT_ANSWER,
    Scene,
    SynthConfig,
    rng_for,
)


def _turns(rounds: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (question, answer) in enumerate(rounds):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def caption_samples(
    scenes: Sequence[Scene], count: int, offset: int, rng: random.Random
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
                "conversations": _turns([(prompt, caption(scene, detailed))]),
            }
        )
    return samples


def instruction_samples(
    stage: str,
    scenes: Sequence[Scene],
    count: int,
    offset: int,
    kinds: dict[str, int],
    multi_turn: float,
    config: SynthConfig,
) -> list[dict[str, Any]]:
    rng = rng_for(config, stage)
    balancer = Balancer(config)
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
                qa, options, letter = choice(scene, config, rng, balancer, config.vary_phrasing)
                lines = [qa.question] + [f"{x}. {o}" for x, o in zip(LETTERS, options, strict=True)]
                rounds.append(("\n".join(lines + [LETTER_ANSWER]), letter))
                continue
            candidates = question_candidates(kind, scene, config, rng, config.vary_phrasing)
            # Never the same question twice, nor the same object in other words.
            qa = balancer.pick([c for c in candidates if topic(c) not in topics], rng)
            if qa is None:
                left.pop(kind, None)
                continue
            # Half the questions carry LLaVA-1.5's short-answer hint, as the eval prompts do.
            suffix = "\n" + SHORT_ANSWER if rng.random() < 0.5 else ""
            rounds.append((qa.question + suffix, capitalise(qa.answer)))
            topics.add(topic(qa))
        if not rounds:  # every kind was skipped for balance: ask the first that fits anyway
            for kind in kinds:
                candidates = (
                    question_candidates(kind, scene, config, rng, config.vary_phrasing)
                    if kind != "choice"
                    else []
                )
                qa = balancer.pick(candidates, rng, skip=False)
                if qa is not None:
                    rounds.append((qa.question, capitalise(qa.answer)))
                    break
        samples.append(
            {"id": f"{stage}_{j:06d}", "image": scene.image, "conversations": _turns(rounds)}
        )
    return samples
