"""moetool.export: sparse checkpoints as native transformers MoE LLaVA checkpoints that load and
give the same logits and tokens without moetool."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetool.export import ExportError, choose_target, export_checkpoint
from moetool.models.build import save_checkpoint
from moetool.models.moe import MoEConfig
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm
from moetool.upcycle import upcycle_checkpoint

CASES = [
    ("qwen3", "interval", 2, "qwen3_moe"),
    ("qwen3", "first-half", 2, "qwen3_moe"),
    ("qwen3", "all", 2, "qwen3_moe"),
    ("qwen2", "interval", 2, "qwen2_moe"),
    ("qwen2", "first-half", 2, "qwen2_moe"),
    ("qwen2", "all", 2, "qwen2_moe"),
    ("llama", "interval", 2, "qwen2_moe"),
    ("llama", "first-half", 2, "qwen2_moe"),
    ("llama", "all", 2, "mixtral"),
    ("llama", "all", 1, "qwen2_moe"),  # raw top-1 weights: Mixtral would renormalise them
    ("mistral", "interval", 2, "qwen2_moe"),
    ("mistral", "first-half", 2, "qwen2_moe"),
    ("mistral", "all", 2, "mixtral"),
]
# Runs in a fresh interpreter that never imports moetool: native transformers only.
NATIVE = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

root = sys.argv[1]
inputs = load_file(f"{root}/inputs.safetensors")
out = {}
for name in json.loads(open(f"{root}/cases.json").read()):
    model = AutoModelForImageTextToText.from_pretrained(f"{root}/{name}/native").eval()
    with torch.no_grad():
        out[f"{name}.logits"] = model(**inputs).logits
        out[f"{name}.tokens"] = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out[f"{name}.type"] = torch.tensor([type(model.model.language_model).__name__ in
                                        ("Qwen3MoeModel", "Qwen2MoeModel", "MixtralModel")])
assert not any(m.startswith("moetool") for m in sys.modules), "moetool was imported"
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/native.safetensors")
"""


def case_name(base, layout, top_k, _target):
    return f"{base}-{layout}-top{top_k}"


def model_inputs(processor, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images = [
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()),
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
    ]
    texts = ["<image>\nWhat is red here?", "<image>\nHow many shapes are there in it?"]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case: dense -> upcycled (Drop-Upcycling, so the experts differ) -> exported."""
    root = tmp_path_factory.mktemp("export")
    for base, layout, top_k, target in CASES:
        name = case_name(base, layout, top_k, target)
        recipe = load_recipe(recipes_root() / f"tiny/{base}.toml", ["model.num_layers=4"])
        model, processor = build_random_lvlm(recipe, seed=len(name))
        save_checkpoint(model, processor, root / name / "dense")
        moe = MoEConfig(num_experts=4, top_k=top_k, layers=layout, drop_upcycling=0.5)
        upcycle_checkpoint(root / name / "dense", root / name / "sparse", moe, seed=1)
        plan = export_checkpoint(root / name / "sparse", root / name / "native")
        assert plan.target == target, name
    save_file(model_inputs(processor), root / "inputs.safetensors")
    (root / "cases.json").write_text(json.dumps([case_name(*c) for c in CASES]))
    (root / "native.py").write_text(NATIVE)
    subprocess.run(
        [sys.executable, str(root / "native.py"), str(root)],
        check=True,
        capture_output=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=""),
        cwd=root,
    )
    return root


@pytest.mark.parametrize("case", CASES, ids=[case_name(*c) for c in CASES])
def test_export_loads_without_moetool_with_the_same_logits_and_tokens(exported, case):
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401

    name = case_name(*case)
    native = load_file(exported / "native.safetensors")
    assert native[f"{name}.type"].item()  # a native MoE language model, not ours
    inputs = load_file(exported / "inputs.safetensors")
    sparse = AutoModelForImageTextToText.from_pretrained(exported / name / "sparse").eval()
    with torch.no_grad():
        logits = sparse(**inputs).logits
        tokens = sparse.generate(**inputs, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(native[f"{name}.logits"], logits, atol=1e-4, rtol=0)
    assert torch.equal(native[f"{name}.tokens"], tokens)
    config = json.loads((exported / name / "native/config.json").read_text())
    assert config["model_type"] == "llava" and "moe" not in config
    assert config["text_config"]["model_type"] == case[3]
    # Tokenizer, processor (and chat template, where there is one) travel with it.
    copied = {p.name for p in (exported / name / "sparse").iterdir()} - {
        "config.json",
        "model.safetensors",
    }
    assert {"tokenizer.json", "processor_config.json"} <= copied
    assert copied <= {p.name for p in (exported / name / "native").iterdir()}


def test_vision_weights_are_in_the_layout_vllm_reads(exported):
    from safetensors import safe_open

    with safe_open(exported / "qwen2-interval-top2/native/model.safetensors", "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    # The empty shared expert of Qwen2-MoE is left out (vLLM refuses zero-size tensors).
    assert not any(".shared_expert." in k for k in keys)


def refusal(base, moe, target="auto", layers=4):
    with pytest.raises(ExportError) as caught:
        choose_target(base, moe.resolved(layers), layers, target)
    return str(caught.value)


@pytest.mark.parametrize("base", ["phi", "stablelm", "gemma2"])
def test_bases_without_a_native_moe_counterpart_are_refused(base):
    assert "no native MoE architecture reproduces a " + base in refusal(base, MoEConfig(4, 2))


def test_capacity_at_inference_and_raw_weights_into_mixtral_are_refused():
    dropping = MoEConfig(4, 2, eval_capacity_factor=1.5)
    assert "drops tokens at inference" in refusal("qwen2", dropping)
    raw = MoEConfig(4, 1, layers="all")
    assert "raw router probabilities" in refusal("llama", raw, "mixtral")
    assert "every Mixtral layer is MoE" in refusal("llama", MoEConfig(4, 2), "mixtral")
    assert "does not reproduce a qwen3 base" in refusal("qwen3", MoEConfig(4, 2), "qwen2_moe")
    # Drop-Upcycling is fine: weights are weights.
    assert choose_target("qwen2", MoEConfig(4, 2, drop_upcycling=0.5).resolved(4), 4) == (
        "qwen2_moe"
    )


def test_export_refuses_a_dense_checkpoint_and_an_out_holding_its_input(exported):
    dense = exported / "qwen2-interval-top2/dense"
    with pytest.raises(ExportError, match="expected a sparse moetool checkpoint"):
        export_checkpoint(dense, exported / "x")
    sparse = exported / "qwen2-interval-top2/sparse"
    with pytest.raises(ExportError, match="contains this command's input"):
        export_checkpoint(sparse, sparse.parent, overwrite=True)
    assert (sparse / "config.json").is_file()
    assert not (exported / "x").exists()


def test_export_command_json_and_error_line(exported, tmp_path):
    script = Path(sys.executable).parent / "moetool"
    sparse = exported / "llama-all-top2/sparse"
    proc = subprocess.run(
        [str(script), "export", str(sparse), str(tmp_path / "out"), "--to", "native", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["target"] == "mixtral" and summary["out"] == str(tmp_path / "out")
    bad = subprocess.run(
        [str(script), "export", str(exported / "llama-all-top2/dense"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr and not (tmp_path / "o2").exists()


# Served = trained: a plain AutoProcessor of the export shapes non-square images as training did.
PROCESSOR_NATIVE = """
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

root = sys.argv[1]
images = [Image.open(f"{root}/{n}.png") for n in ("wide", "tall")]
texts = ["<image>\\nWhat is red here?", "<image>\\nHow many shapes are there in it?"]
out = {}
for ratio in ("pad", "resize"):
    path = f"{root}/{ratio}/native"
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        out[f"{ratio}.logits"] = model(**batch).logits
    out[f"{ratio}.pixel_values"] = batch["pixel_values"]
    out[f"{ratio}.input_ids"] = batch["input_ids"]
assert not any(m.startswith("moetool") for m in sys.modules), "moetool was imported"
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/native.safetensors")
"""


def test_exported_processor_reproduces_training_for_non_square_images(tmp_path):
    """Dense checkpoints trained with pad and with resize, saved with the CLIP processor older
    moetool wrote (resize + centre crop), upcycled and exported: the export through a plain
    AutoProcessor + AutoModelForImageTextToText gives moetool's logits for 96x64 and 50x120
    images, and the pad export's pixels are the padded ones."""
    from PIL import Image
    from transformers import AutoProcessor, CLIPImageProcessor

    from moetool.models.inference import load_checkpoint

    g = torch.Generator().manual_seed(0)
    images = []
    for name, (w, h) in (("wide", (96, 64)), ("tall", (50, 120))):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        images.append(Image.open(tmp_path / f"{name}.png"))
    recipe = load_recipe(recipes_root() / "tiny/qwen2.toml", ["model.num_layers=4"])
    model, processor = build_random_lvlm(recipe, seed=3)
    size = recipe.vision.image_size
    processor.image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    for ratio in ("pad", "resize"):
        stages = {"instruct": {"image_aspect_ratio": ratio}}
        meta = {"stage": "instruct", "recipe": {"stages": stages}}
        save_checkpoint(model, processor, tmp_path / ratio / "dense", metadata=meta)
        moe = MoEConfig(num_experts=4, top_k=2, layers="interval", drop_upcycling=0.5)
        upcycle_checkpoint(tmp_path / ratio / "dense", tmp_path / ratio / "sparse", moe, seed=1)
        upcycled = AutoProcessor.from_pretrained(tmp_path / ratio / "sparse").image_processor
        padding = type(upcycled).__name__ == "LlavaImageProcessor" and upcycled.do_pad
        assert padding == (ratio == "pad")
        export_checkpoint(tmp_path / ratio / "sparse", tmp_path / ratio / "native")
    (tmp_path / "native.py").write_text(PROCESSOR_NATIVE)
    subprocess.run(
        [sys.executable, str(tmp_path / "native.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=""),
        cwd=tmp_path,
    )
    native = load_file(tmp_path / "native.safetensors")
    texts = ["<image>\nWhat is red here?", "<image>\nHow many shapes are there in it?"]
    for ratio in ("pad", "resize"):
        sparse, mine = load_checkpoint(tmp_path / ratio / "sparse")
        batch = mine(images=images, text=texts, return_tensors="pt", padding=True)
        assert torch.equal(native[f"{ratio}.input_ids"], batch["input_ids"])
        assert torch.equal(native[f"{ratio}.pixel_values"], batch["pixel_values"])
        with torch.no_grad():
            logits = sparse(**batch).logits
        torch.testing.assert_close(native[f"{ratio}.logits"], logits, atol=1e-4, rtol=0)
    assert not torch.equal(native["pad.pixel_values"], native["resize.pixel_values"])
    # The padded pixels: the mean colour at the wide image's top edge (normalised to ~0).
    assert native["pad.pixel_values"][0, :, 0, :].abs().max() < 0.02
