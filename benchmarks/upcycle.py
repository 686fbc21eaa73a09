"""Peak memory and wall time of `moetool upcycle` on a generated dense checkpoint, against `cp` of
the output's bytes, in one run. Prints JSON.

The checkpoint is a LLaVA layout (tiny CLIP tower, projector, a Llama-architecture LM) whose
size is set by --layers/--hidden/--ffn (defaults: about 1.1 GB in fp32); tensor contents are
random bytes written block by block, so generating it needs little memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moetool.checkpoint_io import write_safetensors
from moetool.upcycle import OutputTensor

_BLOCK = os.urandom(1 << 20)


def _fill(spec: OutputTensor, f) -> None:
    remaining = spec.nbytes
    while remaining:
        n = min(remaining, len(_BLOCK))
        f.write(_BLOCK[:n])
        remaining -= n


def generate_checkpoint(
    path: Path, layers: int, hidden: int, ffn: int, vocab: int, dtype: str = "F32"
) -> int:
    path.mkdir(parents=True)
    specs = []

    def add(name, *shape):
        specs.append(OutputTensor(name, dtype, tuple(shape), None, "copy"))

    add("language_model.model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        p = f"language_model.model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(f"{p}.self_attn.{proj}.weight", hidden, hidden)
        add(f"{p}.mlp.gate_proj.weight", ffn, hidden)
        add(f"{p}.mlp.up_proj.weight", ffn, hidden)
        add(f"{p}.mlp.down_proj.weight", hidden, ffn)
        add(f"{p}.input_layernorm.weight", hidden)
        add(f"{p}.post_attention_layernorm.weight", hidden)
    add("language_model.model.norm.weight", hidden)
    add("language_model.lm_head.weight", vocab, hidden)
    add("multi_modal_projector.linear_1.weight", hidden, 32)
    add("multi_modal_projector.linear_2.weight", hidden, hidden)
    write_safetensors(path / "model.safetensors", specs, _fill)
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
            "vocab_size": vocab,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    return (path / "model.safetensors").stat().st_size


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The generated checkpoint's size (defaults: about 1.1 GB in fp32) and where it goes."""
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moetool-upcycle-bench-", dir=args.workdir))
    try:
        size = generate_checkpoint(work / "dense", args.layers, args.hidden, args.ffn, args.vocab)
        script = Path(sys.executable).parent / "moetool"
        start = time.perf_counter()
        subprocess.run(
            [
                str(script),
                "upcycle",
                str(work / "dense"),
                str(work / "sparse"),
                "--experts",
                str(args.experts),
                "--json",
            ],
            check=True,
            capture_output=True,
        )
        upcycle_s = time.perf_counter() - start
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out_bytes = sum(p.stat().st_size for p in (work / "sparse").iterdir())
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "sparse"), str(work / "copy")], check=True)
        cp_s = time.perf_counter() - start
        budget = 0.5 * size + 300 * 1024**2
        print(
            json.dumps(
                {
                    "checkpoint_bytes": size,
                    "output_bytes": out_bytes,
                    "upcycle_seconds": upcycle_s,
                    "cp_output_seconds": cp_s,
                    "time_over_cp": upcycle_s / cp_s,
                    "peak_rss_bytes": peak_rss,
                    "rss_budget_bytes": budget,
                    "rss_over_checkpoint": peak_rss / size,
                    "goals": {"time_over_cp_max": 2.0, "peak_rss_max": "0.5 x checkpoint + 300 MB"},
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
