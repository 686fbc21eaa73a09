"""One optimizer step of a ZeRO-2 stage with the optimizer offloaded to the CPU: torch's AdamW
stepping the offloaded fp32 copies (what moetool did before, ``zero_force_ds_cpu_optimizer:
false``) against DeepSpeed's vectorised CPU Adam (what ``offload_optimizer = true`` runs now,
``moetool.train.engine.build_optimizer``). Prints JSON.

One rank, fp32 on the CPU, a Llama language model from its transformers config (default hidden
1024, 4 layers, FFN 2816, vocabulary 8192: about 67M parameters, every one trained), batch 1 x 128
tokens, the same start and data for both. Per step: the whole step (forward, backward,
``engine.step()``), and ``engine.step()`` alone (the optimizer on the offloaded copies, clipping
and the copy back to the model). Medians over ``--steps`` after one warm-up step. The first use of
CPU Adam JIT-builds DeepSpeed's ``cpu_adam`` op (1-2 minutes, cached): not timed.

    python benchmarks/offload_step.py [--hidden 1024 --layers 4 --ffn 2816 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

OPTIMIZERS = ("torch_adamw", "deepspeed_cpu_adam")


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure(name: str, args) -> dict:
    import deepspeed

    from moetool.recipe.schema import StageSection
    from moetool.train.engine import build_optimizer, deepspeed_config

    stage = StageSection(
        data=("x.json",),
        trainable=("llm",),
        global_batch_size=1,
        per_device_batch_size=1,
        lr=2e-5,
        weight_decay=0.0,
        precision="fp32",
        zero_stage=2,
        offload_optimizer=True,
    )
    model = build_model(args)
    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(stage, 1)
    if name == "torch_adamw":
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the offloaded copies
    else:
        optimizer = build_optimizer(stage, params)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    steps, optimizer_steps, losses = [], [], []
    for _ in range(args.steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        stepping = time.perf_counter()
        engine.step()
        done = time.perf_counter()
        steps.append(done - started)
        optimizer_steps.append(done - stepping)
        losses.append(loss.item())
    result = {
        "optimizer": type(engine.basic_optimizer).__name__,
        "step_seconds_median": statistics.median(steps[1:]),
        "optimizer_step_seconds_median": statistics.median(optimizer_steps[1:]),
        "losses": losses,
    }
    del engine, optimizer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from moetool.cli.render import stdout_to_stderr
    from moetool.train.ranks import ensure_distributed_env, init_distributed

    ensure_distributed_env()
    with stdout_to_stderr():  # DeepSpeed's build and start-up messages stay off the JSON
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        init_distributed()
        started = time.perf_counter()
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])  # builds or loads cpu_adam
        op_load_seconds = time.perf_counter() - started
        results = {name: measure(name, args) for name in OPTIMIZERS}
    params = sum(p.numel() for p in build_model(args).parameters())
    torch_, ds = results["torch_adamw"], results["deepspeed_cpu_adam"]
    print(
        json.dumps(
            {
                "setting": {
                    "model": "llama",
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "ffn": args.ffn,
                    "vocab": args.vocab,
                    "params": params,
                    "tokens_per_step": args.seq,
                    "steps": args.steps,
                    "threads": args.threads,
                    "zero_stage": 2,
                    "offload_optimizer": "cpu",
                    "precision": "fp32",
                },
                "cpu_adam_op_load_seconds": op_load_seconds,
                "results": results,
                "step_ratio_torch_over_cpu_adam": torch_["step_seconds_median"]
                / ds["step_seconds_median"],
                "optimizer_step_ratio_torch_over_cpu_adam": torch_["optimizer_step_seconds_median"]
                / ds["optimizer_step_seconds_median"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
