"""moetool.export for the VLM bases beyond LLaVA: each upcycled base that has an exact native twin
exports to it, loads through transformers alone (a fresh interpreter that never imports moetool)
and gives the moetool model's logits and greedy tokens on images of two sizes; the bases with no
twin are refused with the reason."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moetool.checkpoint_io import read_checkpoint_index
from moetool.export import ExportError, export_checkpoint, plan_export
from moetool.models.build import save_checkpoint
from moetool.models.moe import MoEConfig
from moetool.tiny_vlm import build_random_vlm, vlm_inputs
from moetool.upcycle import upcycle_checkpoint

# (base, layer layout, target, the native language model's class); the layouts where the target
# differs (llama and mistral: every layer MoE and renormalised -> Mixtral, else Qwen2-MoE).
CASES = [
    ("llava_next", "interval", "qwen2_moe", "Qwen2MoeModel"),
    ("llava_next", "all", "mixtral", "MixtralModel"),
    ("llava_onevision", "interval", "qwen2_moe", "Qwen2MoeModel"),
    ("internvl", "all", "qwen2_moe", "Qwen2MoeModel"),
    ("idefics3", "interval", "qwen2_moe", "Qwen2MoeModel"),
    ("idefics3", "all", "mixtral", "MixtralModel"),
    ("smolvlm", "interval", "qwen2_moe", "Qwen2MoeModel"),
    ("smolvlm", "all", "mixtral", "MixtralModel"),
    ("mistral3", "interval", "qwen2_moe", "Qwen2MoeModel"),
    ("mistral3", "all", "mixtral", "MixtralModel"),
    ("qwen3_vl", "interval", "qwen3_vl_moe", "Qwen3VLMoeTextModel"),
    ("qwen3_vl", "all", "qwen3_vl_moe", "Qwen3VLMoeTextModel"),
]
VLM_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "qwen3_vl": "Qwen3VLMoeForConditionalGeneration",
}
# Runs in a fresh interpreter that never imports moetool: native transformers only. Records the
# logits, greedy tokens, classes, what loading reported, and the names save_pretrained writes.
NATIVE = """
import json, sys, tempfile
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

root = sys.argv[1]
out, report = {}, {}
for name in json.loads(open(f"{root}/cases.json").read()):
    base = name.split("-")[0]
    inputs = load_file(f"{root}/{base}/inputs.safetensors")
    model, info = AutoModelForImageTextToText.from_pretrained(
        f"{root}/{name}/native", output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        out[f"{name}.logits"] = model(**inputs).logits
        out[f"{name}.tokens"] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    inner = model.model
    text = getattr(inner, "language_model", None) or inner.text_model
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        with safe_open(f"{saved}/model.safetensors", "pt") as f:
            written = sorted(f.keys())
    report[name] = {
        "class": type(model).__name__,
        "text_class": type(text).__name__,
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "saved": written,
    }
assert not any(m.startswith("moetool") for m in sys.modules), "moetool was imported"
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/native.safetensors")
open(f"{root}/native.json", "w").write(json.dumps(report))
"""
PROMPTS = ["What is here?", "Count the shapes."]


def case_name(base, layout, *_):
    return f"{base}-{layout}"


def images() -> list[Image.Image]:
    """Two images of different sizes and aspect ratios (tiling and dynamic resolution see them
    differently)."""
    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(40, 70, 3, generator=g) * 255).to(torch.uint8).numpy()),
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case: dense -> upcycled (Drop-Upcycling, so the experts differ) -> exported, and
    every export loaded by transformers alone in one fresh interpreter."""
    root = tmp_path_factory.mktemp("export_bases")
    for base in dict.fromkeys(c[0] for c in CASES):
        model, processor = build_random_vlm(base, seed=3)
        save_checkpoint(model, processor, root / base / "dense")
        batch = vlm_inputs(processor, images(), PROMPTS)
        save_file(dict(batch), root / base / "inputs.safetensors")
    for base, layout, target, _ in CASES:
        name = case_name(base, layout)
        moe = MoEConfig(num_experts=4, top_k=2, layers=layout, drop_upcycling=0.5)
        upcycle_checkpoint(root / base / "dense", root / name / "sparse", moe, seed=1)
        plan = export_checkpoint(root / name / "sparse", root / name / "native")
        assert plan.target == target, name
    (root / "cases.json").write_text(json.dumps([case_name(*c) for c in CASES]))
    (root / "native.py").write_text(NATIVE)
    proc = subprocess.run(
        [sys.executable, str(root / "native.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=""),
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", CASES, ids=[case_name(*c) for c in CASES])
def test_export_loads_without_moetool_with_the_same_logits_and_tokens(exported, case):
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401

    base, layout, target, text_class = case
    name = case_name(*case)
    report = json.loads((exported / "native.json").read_text())[name]
    assert (report["class"], report["text_class"]) == (VLM_CLASSES[base], text_class)
    info = report["info"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    # Only the empty shared expert of Qwen2-MoE (0 elements) is left out of the file.
    assert all(".shared_expert." in k for k in info["missing_keys"]), info["missing_keys"]
    native = load_file(exported / "native.safetensors")
    inputs = load_file(exported / base / "inputs.safetensors")
    sparse = AutoModelForImageTextToText.from_pretrained(exported / name / "sparse").eval()
    with torch.no_grad():
        logits = sparse(**inputs).logits
        tokens = sparse.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(native[f"{name}.logits"], logits, atol=1e-4, rtol=0)
    assert torch.equal(native[f"{name}.tokens"], tokens)
    config = json.loads((exported / name / "native/config.json").read_text())
    assert "moe" not in config and config["architectures"] == [VLM_CLASSES[base]]
    assert config["model_type"] == ("qwen3_vl_moe" if base == "qwen3_vl" else base)
    # The tensor names are the ones transformers itself writes for this model.
    with safe_open(exported / name / "native/model.safetensors", "pt") as f:
        written = set(f.keys())
    saved = set(report["saved"])
    assert written <= saved and all(".shared_expert." in k for k in saved - written)


def test_qwen3_vl_experts_are_fused_as_the_released_checkpoints_store_them(exported):
    """``gate_up_proj`` [experts, hidden, 2 * intermediate] (gate columns, then up) and
    ``down_proj`` [experts, intermediate, hidden]: the layout of Qwen3-VL-MoE's released
    checkpoints, which vLLM reads (transformers reads either)."""
    sparse = exported / "qwen3_vl-interval/sparse"
    native = load_file(exported / "qwen3_vl-interval/native/model.safetensors")
    experts = load_file(sparse / "model.safetensors")
    layer = "model.language_model.layers.2.mlp"
    gate_up, down = native[f"{layer}.experts.gate_up_proj"], native[f"{layer}.experts.down_proj"]
    assert gate_up.shape == (4, 64, 256) and down.shape == (4, 128, 64)
    for e in range(4):
        gate, up = (experts[f"{layer}.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj"))
        assert torch.equal(gate_up[e], torch.cat([gate, up]).T)
        assert torch.equal(down[e], experts[f"{layer}.experts.{e}.down_proj.weight"].T)
    assert torch.equal(native[f"{layer}.gate.weight"], experts[f"{layer}.router.weight"])
    text = json.loads((exported / "qwen3_vl-interval/native/config.json").read_text())
    text = text["text_config"]
    assert (text["mlp_only_layers"], text["decoder_sparse_step"]) == ([1, 3], 1)
    assert text["tie_word_embeddings"] is False
    assert text["norm_topk_prob"] is True  # vLLM's Qwen3-VL-MoE fails to build without it


def test_qwen3_vl_with_raw_top1_weights_is_refused(exported):
    sparse = exported / "qwen3_vl-all/sparse"
    config = json.loads((sparse / "config.json").read_text())
    config["moe"].update(top_k=1, normalize_top_k=None)
    with pytest.raises(ExportError) as caught:
        plan_export(config, read_checkpoint_index(sparse))
    message = str(caught.value)
    assert "qwen3_vl_moe always renormalises the top-k weights" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "base, reason",
    [
        ("qwen2_vl", "Qwen2VLTextModel"),
        ("qwen2_5_vl", "Qwen2_5_VLTextModel"),
        ("gemma3", "gemma3_text"),
    ],
)
def test_bases_without_a_native_twin_are_refused_in_one_line(base, reason):
    config = {
        "model_type": f"moetool_{base}",
        "moe": {"num_experts": 4, "top_k": 2},
        "text_config": {"num_hidden_layers": 4},
    }
    with pytest.raises(ExportError) as caught:
        plan_export(config, {})
    message = str(caught.value)
    assert message.startswith(f"no native architecture reproduces a {base} model exactly")
    assert reason in message and "serve the checkpoint as it is" in message
    assert "\n" not in message
