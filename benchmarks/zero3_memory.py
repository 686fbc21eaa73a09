"""Peak memory per rank of a 2-process ZeRO-3 start-up (the stage's model load), against the
model's fp32 bytes, in one run. Prints JSON.

Two ways of starting, on the same generated dense LLaVA checkpoint (about 1.1 GB in fp32 by
default; see benchmarks/upcycle.py):

- ``whole-fp32``: what moetool did before: every rank loads the whole model in fp32, and
  DeepSpeed partitions it only in ``deepspeed.initialize``;
- ``partitioned-bf16``: what a bf16 ZeRO-3 stage does now (``moetool.train.runner``'s
  ``partitioned_loading`` and ``load_start_model``'s dtype): the model is built partitioned by
  ``deepspeed.zero.Init`` and loaded in bf16.

Each is run from an fp32 and from a bf16 checkpoint file (the output of a bf16 stage is bf16),
under glibc's default malloc settings and with a fixed mmap threshold. The start-up is the load
plus ``deepspeed.initialize`` (ZeRO-3, no optimizer: optimizer states are the same either way).
Per rank, above what the process held before loading: the peak RSS (the kernel's VmHWM, reset
before loading; it includes the page cache of the checkpoint file that rank 0 maps) and the peak
anonymous memory (RssAnon sampled every 2 ms: what the rank allocated); and the parameter bytes
the rank holds afterwards. Goal: ``partitioned-bf16`` <= 0.6 x the model's fp32 bytes per rank.

    python benchmarks/zero3_memory.py [--layers 12 --hidden 1024 --ffn 4096]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from upcycle import add_checkpoint_arguments, generate_checkpoint  # noqa: E402

MODES = ("whole-fp32", "partitioned-bf16")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonymousPeak:
    """Samples the process's anonymous resident memory (``RssAnon``: what it allocated, not the
    page cache of files it maps) every 2 ms; ``peak`` is the largest sample."""

    def __init__(self):
        import threading

        self.peak = _status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))
        return self.peak


def worker(mode: str, checkpoint: Path, rows: Path) -> None:
    """One rank under torchrun: load the checkpoint as ``mode`` says and let DeepSpeed take the
    model (ZeRO-3, no optimizer: the optimizer's states are the same either way); write its
    figures to ``rows/rank-N.json`` (the ranks share one stdout, where lines can interleave)."""
    import deepspeed
    import torch
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401
    from moetool.recipe.schema import StageSection
    from moetool.train.engine import deepspeed_config, partitioned_loading
    from moetool.train.ranks import init_distributed

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    precision = "bf16" if mode == "partitioned-bf16" else "fp32"
    stage = StageSection(
        data=("x.json",),
        trainable=("llm",),
        zero_stage=3,
        precision=precision,
        global_batch_size=world,
        per_device_batch_size=1,
        lr=1e-5,
    )
    ds_config = deepspeed_config(stage, world)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.distributed.barrier()
    rss_before, anon_before = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak below is the start-up's
    anon = AnonymousPeak()
    if mode == "partitioned-bf16":
        with partitioned_loading(ds_config):
            model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    anon_peak = anon.stop()
    rss_peak = _status_bytes("VmHWM")
    params = list(engine.module.parameters())
    held = sum(
        (p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params
    )
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    row = {
        "rank": rank,
        "rss_before_bytes": rss_before,
        "peak_rss_above_before_bytes": rss_peak - rss_before,
        "peak_anonymous_above_before_bytes": anon_peak - anon_before,
        "params_held_bytes": held,
        "model_fp32_bytes": 4 * full,
    }
    (rows / f"rank-{rank}.json").write_text(json.dumps(row))
    torch.distributed.barrier()


# glibc raises its mmap threshold as large blocks are freed, after which the per-module
# allocate-then-partition of zero.Init on CPU fragments the heap; a fixed threshold keeps large
# blocks in mmap (returned on free). Both are measured.
MALLOC = {
    "glibc default": {},
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def run(mode: str, checkpoint: Path, env: dict) -> list[dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    with tempfile.TemporaryDirectory() as rows:
        proc = subprocess.run(
            [
                str(torchrun),
                "--standalone",
                "--nproc_per_node",
                "2",
                __file__,
                "--worker",
                mode,
                str(checkpoint),
                rows,
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", **env),
        )
        if proc.returncode:
            sys.exit(f"{mode} on {checkpoint.name} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(rows).glob("rank-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODE", "CHECKPOINT", "ROWS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    work = Path(tempfile.mkdtemp(prefix="moetool-zero3-bench-", dir=args.workdir))
    try:
        results = {}
        for file_dtype in ("F32", "BF16"):
            checkpoint = work / file_dtype.lower()
            size = generate_checkpoint(
                checkpoint, args.layers, args.hidden, args.ffn, args.vocab, file_dtype
            )
            for (malloc, env), mode in itertools.product(MALLOC.items(), MODES):
                rows = run(mode, checkpoint, env)
                fp32 = rows[0]["model_fp32_bytes"]
                results[f"{mode} from {file_dtype.lower()} file, {malloc}"] = {
                    "checkpoint_bytes": size,
                    "model_fp32_bytes": fp32,
                    "ranks": rows,
                    "peak_rss_over_fp32": [
                        round(r["peak_rss_above_before_bytes"] / fp32, 3) for r in rows
                    ],
                    "peak_anonymous_over_fp32": [
                        round(r["peak_anonymous_above_before_bytes"] / fp32, 3) for r in rows
                    ],
                    "held_over_fp32": [round(r["params_held_bytes"] / fp32, 3) for r in rows],
                }
        print(
            json.dumps(
                {"results": results, "goal": "partitioned-bf16: peak <= 0.6 x fp32 per rank"},
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
