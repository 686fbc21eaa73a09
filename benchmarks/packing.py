"""Padding-free packing against padded micro-batches, with and without modality-length grouping,
on a length mix like LLaVA-mix665k's (stage II/III data of the paper's recipes). Prints JSON.

The mix: LLaVA-1.5's instruction data as its model card lists it (158K GPT-generated image
conversations, about 467K academic-task VQA image conversations, 40K ShareGPT text-only
conversations; 665K in all). Each image sample is 576 image tokens (CLIP-L/336) plus its text.
ASSUMED here (the real file cannot be read offline): text lengths in words drawn from log-normal
distributions (medians LLaVA-Instruct 140 words, sigma 0.6; academic VQA 70, 0.7, several short
questions per image; ShareGPT 540, 0.9) and 1.3 tokens per word with a per-sample spread (sigma
0.25: prose, numbers and OCR text tokenize differently); every sample cut at ``max_length``
2048. Grouping orders by words, as LLaVA's ``modality_lengths`` does, so its batches are not
perfectly even in tokens.

Per mode (padded, padded + modality-length grouping, packed):
- processed tokens per real token over one whole epoch, from the real ``StageBatchSampler`` (the
  paper's global batch 128 = 8 ranks x ``--micro-batch`` 4 x accumulation 4): a padded
  micro-batch costs micro-batch x its longest sample, a packed one its samples' sum;
- wall time per real token on this CPU: forward + backward of a Llama language model (its
  transformers config, fp32) over the same ``--timed-samples`` samples of the mix in every mode,
  cut into micro-batches by the same sampler (one rank, the subset as one global batch), built by
  moetool's ``collate`` / ``collate_packed``; padded modes run sdpa, packed runs what training
  runs on packed rows (moetool's per-sample sdpa, ``models/packed_attention.py``), and
  ``packed_block_mask`` shows plain sdpa over the whole packed row (a block-diagonal mask).
  Modes are interleaved over ``--repeats`` rounds; each mode's fastest round is the figure
  (the least disturbed by other work on the machine), its median beside it.

    python benchmarks/packing.py [--samples 665000 --timed-samples 48 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from moetool.data.llava_json import Sample
from moetool.data.pipeline import StageBatchSampler
from moetool.data.preprocess import IGNORE_INDEX, collate, collate_packed

IMAGE_TOKENS = 576
TOKENS_PER_WORD, TOKENS_PER_WORD_SIGMA = 1.3, 0.25
# source: (share of the 665K samples, has an image, median text words, log-normal sigma)
MIX = {
    "llava_instruct_158k": (158 / 665, True, 140, 0.6),
    "academic_vqa_467k": (467 / 665, True, 70, 0.7),
    "sharegpt_40k": (40 / 665, False, 540, 0.9),
}
MODES = ("padded", "padded_grouped", "packed", "packed_block_mask")


def synthetic_mix(n: int, max_length: int, seed: int) -> tuple[list[Sample], list[int]]:
    """``n`` samples of the mix (their text as words, which grouping counts) and their token
    lengths."""
    g = torch.Generator().manual_seed(seed)
    counts = [round(n * share) for share, *_ in MIX.values()]
    counts[-1] = n - sum(counts[:-1])
    samples, lengths = [], []
    for (name, (_, image, median, sigma)), count in zip(MIX.items(), counts, strict=True):
        words = (median * torch.exp(sigma * torch.randn(count, generator=g))).round().clamp(min=6)
        ratio = TOKENS_PER_WORD * torch.exp(TOKENS_PER_WORD_SIGMA * torch.randn(count, generator=g))
        tokens = (words * ratio).round().long().tolist()
        for i, (w, t) in enumerate(zip(words.long().tolist(), tokens, strict=True)):
            images = ("image.jpg",) if image else ()
            samples.append(Sample(f"{name}-{i}", name, images, (("gpt", "w " * w),)))
            lengths.append(min(max_length, t + (IMAGE_TOKENS if image else 0)))
    return samples, lengths


def micro_batches(samples, lengths, grouped, micro, world, global_batch, seed) -> list[list[int]]:
    """Every micro-batch's sample lengths, rank by rank, from the training sampler."""
    out = []
    for rank in range(world):
        sampler = StageBatchSampler(
            samples, micro, rank, world, seed, grouped, global_batch=global_batch
        )
        out.extend([lengths[i] for i in indices] for indices in sampler)
    return out


def processed_tokens(batches: list[list[int]], packed: bool) -> int:
    return sum(sum(b) if packed else len(b) * max(b) for b in batches)


def encoded(lens: list[int], vocab: int, g) -> list[dict]:
    items = []
    for n in lens:
        ids = torch.randint(4, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        items.append({"input_ids": ids, "labels": labels})
    return items


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=args.max_length * args.micro_batch,
        use_cache=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def time_batches(model, batches, mode, vocab, seed) -> float:
    """Seconds of forward + backward over ``batches`` (lists of sample lengths) in ``mode``."""
    from moetool.models.packed_attention import PACKED_SDPA, register

    register()
    model.set_attn_implementation(PACKED_SDPA if mode == "packed" else "sdpa")
    g = torch.Generator().manual_seed(seed)
    seconds = 0.0
    for lens in batches:
        items = encoded(lens, vocab, g)
        batch = collate(items, 0) if mode.startswith("padded") else collate_packed(items)
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        seconds += time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=665_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--timed-samples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples, lengths = synthetic_mix(args.samples, args.max_length, args.seed)
    epoch = {}
    for mode in MODES[:3]:
        batches = micro_batches(
            samples, lengths, mode == "padded_grouped", args.micro_batch, args.world,
            args.global_batch, args.seed,
        )  # fmt: skip
        real = sum(map(sum, batches))
        epoch[mode] = (processed_tokens(batches, mode == "packed"), real)
    epoch["packed_block_mask"] = epoch["packed"]
    # The timed subset: the same samples in every mode, cut as the sampler cuts them.
    g = torch.Generator().manual_seed(args.seed + 1)
    chosen = torch.randperm(len(samples), generator=g)[: args.timed_samples].tolist()
    subset, subset_lengths = [samples[i] for i in chosen], [lengths[i] for i in chosen]
    timed = {
        mode: micro_batches(
            subset,
            subset_lengths,
            mode == "padded_grouped",
            args.micro_batch,
            1,
            args.timed_samples,
            args.seed,
        )  # fmt: skip
        for mode in MODES
    }
    model = build_model(args)
    time_batches(model, timed["padded"][:1], "padded", args.vocab, args.seed)  # warm-up
    rounds = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            rounds[mode].append(time_batches(model, timed[mode], mode, args.vocab, args.seed))
    results = {}
    for mode in MODES:
        processed, real = epoch[mode]
        timed_real = sum(map(sum, timed[mode]))
        results[mode] = {
            "processed_per_real_token": processed / real,
            "epoch_real_tokens": real,
            "epoch_processed_tokens": processed,
            "timed_micro_batches": len(timed[mode]),
            "timed_processed_tokens": processed_tokens(timed[mode], mode.startswith("packed")),
            "timed_real_tokens": timed_real,
            # the fastest round: the least disturbed by other work on the machine
            "seconds_per_1k_real_tokens": 1000 * min(rounds[mode]) / timed_real,
            "seconds_per_1k_real_tokens_median": 1000
            * statistics.median(rounds[mode])
            / timed_real,
            "rounds_seconds": rounds[mode],
        }
    grouped, packed = results["padded_grouped"], results["packed"]
    report = {
        "setting": {
            **vars(args),
            "image_tokens": IMAGE_TOKENS,
            "tokens_per_word": [TOKENS_PER_WORD, TOKENS_PER_WORD_SIGMA],
            "mix": {
                k: {"share": s, "image": i, "median_words": m, "sigma": sg}
                for k, (s, i, m, sg) in MIX.items()
            },
            "median_length": statistics.median(lengths),
            "mean_length": sum(lengths) / len(lengths),
        },
        "results": results,
        "packed_time_per_real_token_over_grouped": packed["seconds_per_1k_real_tokens"]
        / grouped["seconds_per_1k_real_tokens"],
        "goal_met": packed["processed_per_real_token"] <= 1.05
        and packed["seconds_per_1k_real_tokens"] < grouped["seconds_per_1k_real_tokens"],
    }
    assert math.isclose(packed["processed_per_real_token"], 1.0)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
