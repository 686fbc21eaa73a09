"""A packed stage (``packing = true``) is the padded stage without the padding: through the real
CLI on DeepSpeed, stage II (dense) and stage III (sparse, upcycled on the fly) give the same
step losses (1e-5) and the same trained weights (1e-4; fp32), with image and text-only samples
of different lengths mixed in every micro-batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
SCRIPT = str(Path(sys.executable).parent / "moetool")


def cli(*args):
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def add_text_only_samples(workdir: Path, files=("stage2.json", "stage3.json")) -> None:
    """Text-only conversations of several lengths among the image questions."""
    for name in files:
        path = workdir / "data" / name
        samples = json.loads(path.read_text())
        for i in range(0, len(samples), 3):
            words = " ".join(["colour"] * (1 + 7 * (i % 5)))
            samples.insert(
                i,
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": f"Repeat: {words}"},
                        {"from": "gpt", "value": words},
                    ],
                },
            )
        path.write_text(json.dumps(samples))


def losses(run: Path, stage: str) -> list[float]:
    rows = (run / f"{stage}-state/metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


def test_packed_stages_equal_the_padded_ones(workdir, pretrained):
    add_text_only_samples(workdir)
    for stage, init in (("instruct", "run/pretrain"), ("moe_tune", "run/instruct")):
        steps = ["--set", f"stages.{stage}.max_steps=4"]
        command = stage.replace("_", "-")
        cli(command, "recipe.toml", "--out", "run", "--init", init, *steps)
        packed = ["--set", f"stages.{stage}.packing=true"]
        cli(command, "recipe.toml", "--out", "packed", "--init", init, *steps, *packed)
        padded_losses, packed_losses = (
            losses(workdir / "run", stage),
            losses(workdir / "packed", stage),
        )
        assert len(padded_losses) == len(packed_losses) == 4
        assert max(abs(a - b) for a, b in zip(padded_losses, packed_losses, strict=True)) <= 1e-5
        padded_w, packed_w = weights(workdir / "run" / stage), weights(workdir / "packed" / stage)
        assert padded_w.keys() == packed_w.keys()
        # Adam divides by the gradients' root mean square: rounding-level gradient differences
        # become larger weight differences than the losses show (still far below one step's lr).
        assert max((padded_w[k] - packed_w[k]).abs().max().item() for k in padded_w) <= 1e-4
        assert any(
            not torch.equal(padded_w[k], weights(workdir / init)[k])
            for k in padded_w
            if k in weights(workdir / init)
        )
        recorded = json.loads((workdir / "packed" / stage / "config.json").read_text())
        assert recorded["moetool"]["recipe"]["stages"][stage]["packing"] is True
