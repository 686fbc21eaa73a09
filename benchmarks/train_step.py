"""Training step time of stage III (sparse, FFNs + routers train) against stage II (dense, LLM +
projector train) on the same preset, against the equal-FLOP ideal. Prints JSON.

The ideal is the ratio of the floating-point operations of one step, counted by
torch.utils.flop_counter on the real models (forward, backward of what trains, nothing else):
a stage III step that takes ``flops_III / flops_II`` of a stage II step is at the ideal.
Default preset: Llama LM hidden 256, 4 layers, FFN 1024, CLIP tower 64 wide, 64 image tokens,
batch 8 x 256 tokens, 4 experts top-2 every other layer; fp32, 2 threads, AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args):
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401
    from moetool.models.configuration_moe_llava import MoELlavaConfig
    from moetool.models.moe.config import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import plan_upcycle, upcycle_state_dict

    recipe = load_recipe(
        recipes_root() / "tiny/llama.toml",
        [
            f"model.hidden_size={args.hidden}",
            f"model.ffn_hidden_size={args.ffn}",
            f"model.num_layers={args.layers}",
            "model.num_heads=8",
            "model.num_kv_heads=8",
            "vision.image_size=64",
            "vision.hidden_size=64",
            "vision.intermediate_size=256",
            "vision.num_heads=4",
            f"moe.num_experts={args.experts}",
            f"moe.top_k={args.top_k}",
        ],
    )
    dense, _ = build_random_lvlm(recipe, seed=0)
    state = {k: v for k, v in dense.state_dict().items()}
    entries = {k: ("F32", tuple(v.shape)) for k, v in state.items()}
    options = MoEConfig(num_experts=args.experts, top_k=args.top_k, router_std=0.5)
    plan = plan_upcycle(entries, args.layers, args.hidden, options)
    config = dense.config.to_dict()
    config.pop("model_type", None)
    sparse = AutoModelForImageTextToText.from_config(
        MoELlavaConfig(**config, moe=plan.moe.to_dict())
    )
    sparse.load_state_dict(upcycle_state_dict(state, plan))
    return recipe, dense, sparse


def make_batch(model, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = model.config
    ids = torch.randint(20, config.text_config.vocab_size, (batch, seq), generator=g)
    ids[:, 1 : 1 + config.image_seq_length] = config.image_token_id
    size = config.vision_config.image_size
    labels = ids.clone()
    labels[ids == config.image_token_id] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


def step_fn(model, parts, batch):
    from moetool.models.parts import set_trainable

    set_trainable(model, parts)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def flops(model, parts, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from moetool.models.parts import set_trainable

    set_trainable(model, parts)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, dense, sparse = build(args)
    batch = make_batch(dense, args.batch, args.seq)
    stages = {
        "stage2_dense": (dense, ("llm", "projector")),
        "stage3_sparse": (sparse, ("ffn", "routers")),
    }
    counted = {name: flops(m, parts, batch) for name, (m, parts) in stages.items()}
    steps = {name: step_fn(m, parts, batch) for name, (m, parts) in stages.items()}
    times: dict[str, list[float]] = {name: [] for name in stages}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    ideal = counted["stage3_sparse"] / counted["stage2_dense"]
    measured = median["stage3_sparse"] / median["stage2_dense"]
    print(
        json.dumps(
            {
                "preset": vars(args),
                "step_seconds_median": median,
                "flops_per_step": counted,
                "stage3_over_stage2_time": measured,
                "stage3_over_stage2_equal_flop_ideal": ideal,
                "time_over_ideal": measured / ideal,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
