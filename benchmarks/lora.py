"""Stage III three ways on one sparse model: full MoE-Tuning (FFNs and routers), LoRA (adapters
on every FFN, routers in full) and QLoRA (the same on nf4 base weights). Prints JSON.

The model is a LLaVA-layout LVLM with a Llama language model from its transformers config
(default hidden 1024, 8 layers, FFN 2816), upcycled to x4-Top2 on every other layer (the paper's
layout), with a tiny vision tower; written once to a temporary folder. Each way runs in its own
process (its peak memory is its own), through moetool's own pieces: the stage's model load
(``quantization_config`` for QLoRA), ``set_trainable``, ``apply_lora``, the stage's optimizer and
DeepSpeed ZeRO-2 config, fp32 on the CPU, batch 1 x ``--seq`` text tokens. Per way: trainable
parameters, optimizer-state bytes (AdamW's two moments, what DeepSpeed's optimizer holds), the
model's stored weight bytes, the process's resident memory after the steps and its peak (on a
CPU the peak includes loading: QLoRA reads fp32 weights before quantizing them), and the median
step time over ``--steps`` after one warm-up step. Ratios against full tuning.

    python benchmarks/lora.py [--hidden 1024 --layers 8 --ffn 2816 --r 16 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("full", "lora", "qlora")


def build_checkpoint(args, root: Path) -> Path:
    """The dense LVLM of the chosen size, upcycled: the stage's starting checkpoint."""
    from moetool.models.build import save_checkpoint
    from moetool.models.moe import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    recipe = load_recipe(
        recipes_root() / "tiny/llama.toml",
        [
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            f"model.ffn_hidden_size={args.ffn}",
            f"model.num_heads={args.hidden // 64}",
            f"model.num_kv_heads={args.hidden // 64}",
            "model.vocab_size=1024",
        ],
    )
    model, processor = build_random_lvlm(recipe, seed=0)
    save_checkpoint(model, processor, root / "dense")
    moe = MoEConfig(num_experts=4, top_k=2, layers="interval", router_std=0.02)
    upcycle_checkpoint(root / "dense", root / "sparse", moe)
    return root / "sparse"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_way(way: str, checkpoint: Path, args) -> dict:
    """One way, in this process: load, wrap, train ``--steps`` + 1 steps."""
    import deepspeed
    import psutil
    import torch
    from transformers import AutoModelForImageTextToText

    from moetool.models.lora import apply_lora, quantization_config
    from moetool.models.parts import set_trainable
    from moetool.models.registration import register
    from moetool.recipe.schema import LoraSection, StageSection
    from moetool.train.engine import build_optimizer, deepspeed_config
    from moetool.train.ranks import ensure_distributed_env, init_distributed

    torch.set_num_threads(args.threads)
    register()
    ensure_distributed_env()
    init_distributed()
    stage = StageSection(
        trainable=("ffn", "routers") if way == "full" else ("routers",),
        data=("x.json",),
        lr=2e-4,
        global_batch_size=1,
        per_device_batch_size=1,
        precision="fp32",
        zero_stage=2,
    )
    lora = LoraSection(
        r=args.r, alpha=2.0 * args.r, dropout=0.05, quantize="nf4" if way == "qlora" else "none"
    )
    extra = {}
    if way == "qlora":
        extra["quantization_config"] = quantization_config(lora, torch.float32)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32, **extra)
    trainable = set_trainable(model, stage.trainable)
    if way != "full":
        model = apply_lora(model, lora, trainable)
    loaded_rss = peak_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(stage, params)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(stage, 1)
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 1024, (1, args.seq), generator=g)
    times, losses = [], []
    for _ in range(args.steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    rss_now = psutil.Process().memory_info().rss  # after the steps: the run's working set
    state_bytes = sum(
        t.numel() * t.element_size()
        for state in engine.basic_optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    weights = [*engine.module.parameters(), *engine.module.buffers()]
    return {
        "trainable_params": sum(p.numel() for p in params),
        # the model's weights as stored (4-bit where quantized), adapters and buffers included
        "model_bytes": sum(t.numel() * t.element_size() for t in weights),
        "rss_after_steps_bytes": rss_now,
        "optimizer_state_bytes": state_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_load_bytes": loaded_rss,
        "step_seconds_median": statistics.median(times[1:]),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--way", help=argparse.SUPPRESS)  # a child process: one way
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from moetool.cli.render import stdout_to_stderr

    if args.way:
        with stdout_to_stderr():
            result = run_way(args.way, Path(args.checkpoint), args)
        print(json.dumps(result))
        return
    ways = [w for w in args.ways.split(",") if w]
    with tempfile.TemporaryDirectory(prefix="moetool-lora-bench-") as tmp:
        with stdout_to_stderr():
            checkpoint = build_checkpoint(args, Path(tmp))
        results = {}
        for way in ways:
            child = [
                sys.executable,
                __file__,
                f"--way={way}",
                f"--checkpoint={checkpoint}",
                *(f"--{k}={getattr(args, k)}" for k in ("hidden", "r", "seq", "steps", "threads")),
            ]
            proc = subprocess.run(child, capture_output=True, text=True, check=False)
            if proc.returncode:
                results[way] = {"error": proc.stderr.strip().splitlines()[-1:]}
                continue
            results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = results.get("full", {})
    ratios = {}
    for way in ways:
        if way == "full" or "error" in results[way] or "error" in full:
            continue
        ratios[way] = {
            key: results[way][key] / full[key]
            for key in (
                "trainable_params",
                "optimizer_state_bytes",
                "model_bytes",
                "rss_after_steps_bytes",
                "peak_rss_bytes",
            )
        }
        ratios[way]["step_time"] = results[way]["step_seconds_median"] / full["step_seconds_median"]
    setting = {
        k: getattr(args, k) for k in ("hidden", "layers", "ffn", "r", "seq", "steps", "threads")
    }
    setting.update(
        model="llama LVLM, x4-Top2 every other layer",
        alpha=2 * args.r,
        lora_targets=["ffn"],
        precision="fp32",
        zero_stage=2,
        device="cpu",
    )
    print(json.dumps({"setting": setting, "results": results, "ratios_to_full": ratios}, indent=1))


if __name__ == "__main__":
    main()
