"""ZeRO-Offload as DeepSpeed means it: DeepSpeed's CPU Adam steps the offloaded optimizer states
and gives torch AdamW's updates. Builds DeepSpeed's ``cpu_adam`` op on first use (about 1-2 min,
cached under ~/.cache/torch_extensions)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetool.recipe.schema import StageSection
from moetool.train.engine import build_optimizer, lr_lambda

pytestmark = pytest.mark.integration
SCRIPT = str(Path(sys.executable).parent / "moetool")


def test_cpu_adam_gives_torch_adamw_updates_over_several_steps():
    """build_optimizer's two AdamWs (offloaded: DeepSpeed's CPU Adam; else torch's) on the same
    fp32 parameters and gradients, with weight decay and a warmup-cosine schedule."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    stage = StageSection(
        data=("x.json",),
        trainable=("llm",),
        global_batch_size=1,
        per_device_batch_size=1,
        lr=1e-2,
        weight_decay=0.1,
    )
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    start = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    cpu_adam = build_optimizer(dataclasses.replace(stage, offload_optimizer=True), ours)
    adamw = build_optimizer(stage, ref)
    assert type(cpu_adam) is DeepSpeedCPUAdam and type(adamw) is torch.optim.AdamW
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lr_lambda("cosine", 2, 6)) for o in (cpu_adam, adamw)
    ]
    for _ in range(6):
        grads = [torch.randn(s) for s in shapes]
        for params, optimizer, schedule in zip(
            (ours, ref), (cpu_adam, adamw), schedules, strict=True
        ):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
            schedule.step()
    moved = max((r - s).abs().max().item() for r, s in zip(ref, start, strict=True))
    assert moved > 0.02  # the steps did move the parameters
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def _pretrain(workdir: Path, out: str, *sets: str) -> dict:
    args = ["pretrain", "recipe.toml", "--out", out, "--json"]
    for key in ("max_steps=3", "weight_decay=0.1", *sets):
        args += ["--set", f"stages.pretrain.{key}"]
    proc = subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=900, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _final(workdir: Path, out: str) -> tuple[dict, dict]:
    stage = workdir / out / "pretrain"
    training = json.loads((stage / "config.json").read_text())["moetool"]["training"]
    return _weights(stage), training


def test_an_offloaded_zero2_stage_steps_with_cpu_adam_as_torch_adamw_would(workdir):
    """The same fp32 ZeRO-2 stage, optimizer offloaded (DeepSpeed's CPU Adam on the CPU copies)
    and not (torch AdamW), through the real CLI: the same trained weights."""
    _pretrain(workdir, "offloaded", "offload_optimizer=true")
    _pretrain(workdir, "plain")
    offloaded, offloaded_training = _final(workdir, "offloaded")
    plain, plain_training = _final(workdir, "plain")
    assert offloaded_training["optimizer"] == "DeepSpeedCPUAdam"
    assert plain_training["optimizer"] == "AdamW"
    from moetool.recipe import load_recipe
    from moetool.tiny import build_random_lvlm

    recipe = load_recipe(workdir / "recipe.toml")
    build_random_lvlm(recipe, seed=recipe.stages.pretrain.seed)[0].save_pretrained("start")
    start = _weights(workdir / "start")
    moved = {k for k in plain if not torch.equal(plain[k], start[k])}
    assert moved and all("projector" in k for k in moved)  # stage I trains the projector
    for key, value in plain.items():
        torch.testing.assert_close(offloaded[key], value, rtol=0, atol=1e-5, msg=key)
