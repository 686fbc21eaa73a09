import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moetool.models.build import save_checkpoint
from moetool.models.moe.config import MoEConfig
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm
from moetool.upcycle import (
    MLP_STRUCTURES,
    UpcycleError,
    plan_upcycle,
    read_checkpoint_index,
    upcycle_checkpoint,
    upcycle_state_dict,
)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "dense"
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/llama.toml"), seed=2)
    save_checkpoint(model, processor, path)
    return path


def all_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_source_tensor_lands_and_experts_are_exact_copies(dense, tmp_path):
    plan = upcycle_checkpoint(
        dense, tmp_path / "s", MoEConfig(num_experts=3, top_k=2, layers=(1, 3))
    )
    src = all_tensors(dense)
    out = all_tensors(tmp_path / "s")
    mlp_sources = set()
    for spec in plan.tensors:
        if spec.kind == "expert":
            mlp_sources.add(spec.source)
            assert torch.equal(out[spec.name], src[spec.source])
        elif spec.kind == "copy":
            assert torch.equal(out[spec.name], src[spec.source])
    copies = {s.source for s in plan.tensors if s.kind == "copy"}
    assert copies | mlp_sources == set(src) and not copies & mlp_sources
    assert len(mlp_sources) == 2 * 3  # two MoE layers x gate/up/down
    routers = [k for k in out if k.endswith("mlp.router.weight")]
    assert len(routers) == 2 and all(out[k].dtype == torch.float32 for k in routers)
    assert all(out[k].shape == (3, 64) for k in routers)
    assert len(out) == len(src) - 6 + 6 * 3 + 2
    config = json.loads((tmp_path / "s/config.json").read_text())
    assert config["model_type"] == "moetool_llava"
    assert config["moe"]["layers"] == [1, 3] and config["moe"]["num_experts"] == 3
    assert config["moetool"]["stage"] == "upcycled"
    for name in ("tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (tmp_path / "s" / name).read_bytes() == (dense / name).read_bytes()
    assert not list(tmp_path.glob("s.tmp-*"))


def test_streamed_output_equals_the_pure_function(dense, tmp_path):
    options = MoEConfig(router_init="kaiming", drop_upcycling=0.25)
    upcycle_checkpoint(dense, tmp_path / "s", options, seed=7)
    entries = read_checkpoint_index(dense)
    plan = plan_upcycle(entries, 4, 64, options, seed=7)
    expected = upcycle_state_dict(all_tensors(dense), plan)
    out = all_tensors(tmp_path / "s")
    assert set(out) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name


def test_router_init_modes(dense):
    entries = read_checkpoint_index(dense)
    for mode, check in (
        ("zeros", lambda w: torch.count_nonzero(w) == 0),
        ("normal", lambda w: abs(w.std().item() - 0.05) < 0.01),
        ("kaiming", lambda w: w.abs().max().item() <= 1 / 8 + 1e-6 and w.std() > 0),
    ):
        plan = plan_upcycle(entries, 4, 64, MoEConfig(router_init=mode, router_std=0.05))
        routers = [
            v
            for k, v in upcycle_state_dict(all_tensors(dense), plan).items()
            if k.endswith("router.weight")
        ]
        assert all(check(w) for w in routers), mode
    a = upcycle_state_dict(all_tensors(dense), plan_upcycle(entries, 4, 64, MoEConfig(), seed=1))
    b = upcycle_state_dict(all_tensors(dense), plan_upcycle(entries, 4, 64, MoEConfig(), seed=2))
    key = next(k for k in a if k.endswith("router.weight"))
    assert not torch.equal(a[key], b[key])


def test_drop_upcycling_reinitialises_one_shared_fraction_per_expert(dense):
    entries = read_checkpoint_index(dense)
    src = all_tensors(dense)
    plan = plan_upcycle(entries, 4, 64, MoEConfig(drop_upcycling=0.25), seed=3)
    out = upcycle_state_dict(src, plan)
    prefix = "language_model.model.layers.0.mlp"
    gate, up, down = (src[f"{prefix}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
    changed_sets = []
    for e in range(4):
        eg = out[f"{prefix}.experts.{e}.gate_proj.weight"]
        eu = out[f"{prefix}.experts.{e}.up_proj.weight"]
        ed = out[f"{prefix}.experts.{e}.down_proj.weight"]
        rows_g = set((eg != gate).any(1).nonzero().flatten().tolist())
        rows_u = set((eu != up).any(1).nonzero().flatten().tolist())
        cols_d = set((ed != down).any(0).nonzero().flatten().tolist())
        assert rows_g == rows_u == cols_d  # shared by the expert's projections
        assert len(rows_g) == round(0.25 * 128)
        kept = sorted(set(range(128)) - rows_g)
        assert torch.equal(eg[kept], gate[kept])
        # Re-drawn from the weight's own statistics.
        fresh = eg[sorted(rows_g)]
        assert abs(fresh.std().item() - gate.std().item()) < 0.3 * gate.std().item()
        changed_sets.append(frozenset(rows_g))
    assert len(set(changed_sets)) == 4  # a different fraction for every expert


def test_sharded_output_with_index(dense, tmp_path):
    upcycle_checkpoint(dense, tmp_path / "s", MoEConfig(), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "s/model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    for name in files:
        with safe_open(str(tmp_path / "s" / name), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][key] == name
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401

    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "s").moe_layer_indices() == [0, 2]


def test_refusals(dense, tmp_path):
    with pytest.raises(UpcycleError, match="moe.num_experts: must be at least 2"):
        upcycle_checkpoint(dense, tmp_path / "a", MoEConfig(num_experts=1, top_k=1))
    with pytest.raises(UpcycleError, match="moe.top_k: 5 is greater than num_experts"):
        upcycle_checkpoint(dense, tmp_path / "a", MoEConfig(num_experts=4, top_k=5))
    with pytest.raises(UpcycleError, match="out of range"):
        upcycle_checkpoint(dense, tmp_path / "a", MoEConfig(layers=(0, 4)))
    upcycle_checkpoint(dense, tmp_path / "s", MoEConfig())
    with pytest.raises(UpcycleError, match="already exists"):
        upcycle_checkpoint(dense, tmp_path / "s", MoEConfig())
    upcycle_checkpoint(dense, tmp_path / "s", MoEConfig(num_experts=2), overwrite=True)
    assert json.loads((tmp_path / "s/config.json").read_text())["moe"]["num_experts"] == 2
    with pytest.raises(UpcycleError, match="already sparse"):
        upcycle_checkpoint(tmp_path / "s", tmp_path / "b", MoEConfig())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UpcycleError, match="no such checkpoint"):
        upcycle_checkpoint(tmp_path / "missing", tmp_path / "c", MoEConfig())


def test_unknown_mlp_structure_names_the_supported_ones():
    entries = {
        "language_model.model.layers.0.mlp.dense_h_to_4h.weight": ("F32", (8, 4)),
        "language_model.model.layers.0.mlp.dense_4h_to_h.weight": ("F32", (4, 8)),
    }
    with pytest.raises(UpcycleError) as info:
        plan_upcycle(entries, 1, 4, MoEConfig(layers="all"))
    message = str(info.value)
    assert "dense_4h_to_h" in message
    assert all(s.name in message for s in MLP_STRUCTURES)


def test_vision_tower_mlps_are_not_upcycled(dense):
    plan = plan_upcycle(read_checkpoint_index(dense), 4, 64, MoEConfig(layers="all"))
    assert all("vision_tower" not in s.name for s in plan.tensors if s.kind != "copy")


def test_cli_upcycle_and_errors(dense, tmp_path):
    script = Path(sys.executable).parent / "moetool"
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [
            str(script),
            "upcycle",
            str(dense),
            str(tmp_path / "s"),
            "--experts",
            "4",
            "--topk",
            "2",
            "--layers",
            "interval",
            "--router-init",
            "zeros",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["moe"]["layers"] == [0, 2]
    again = subprocess.run(
        [str(script), "upcycle", str(dense), str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_streaming_upcycle_does_not_import_torch(dense, tmp_path):
    code = (
        "import sys\n"
        "from moetool.models.moe.config import MoEConfig\n"
        "from moetool.upcycle import upcycle_checkpoint\n"
        f"upcycle_checkpoint({str(dense)!r}, {str(tmp_path / 's')!r}, MoEConfig())\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False"]


@pytest.mark.parametrize(("top_k", "flags"), [(1, []), (2, ["--drop-upcycling", "0.5"])])
def test_router_learns_from_the_lm_loss_alone(dense, tmp_path, top_k, flags):
    """`moetool upcycle --experts 4 --topk 1`, nothing else: with the balancing and z losses
    off, the LM loss alone gives every router a gradient (top-1 weights each token by its raw
    router probability; renormalising one weight would make it 1 and the gradient 0). Top-2
    renormalised weights sum to 1, so exact copies give the router no LM gradient until the
    experts differ (as they do after the first steps, or with Drop-Upcycling, used here)."""
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401

    script = Path(sys.executable).parent / "moetool"
    argv = [str(script), "upcycle", str(dense), str(tmp_path / "s"), "--experts", "4"]
    proc = subprocess.run([*argv, "--topk", str(top_k), "--aux-loss-coef", "0", *flags])
    assert proc.returncode == 0
    moe = json.loads((tmp_path / "s/config.json").read_text())["moe"]
    assert moe["normalize_top_k"] is (top_k == 2)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").train()
    assert model.moe_config.aux_loss_coef == 0 and model.moe_config.z_loss_coef == 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, model.config.text_config.vocab_size, (2, 24), generator=g)
    ids[:, 1 : 1 + model.config.image_seq_length] = model.config.image_token_id
    size = model.config.vision_config.image_size
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, size, size, generator=g), labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss)
    out.loss.backward()
    routers = [b.router.weight.grad for b in model.moe_blocks()]
    assert len(routers) == 2 and all(grad.abs().max() > 1e-6 for grad in routers)


def test_cli_refuses_renormalised_top1_and_names_why(dense, tmp_path):
    script = Path(sys.executable).parent / "moetool"
    argv = [str(script), "upcycle", str(dense), str(tmp_path / "s"), "--topk", "1"]
    proc = subprocess.run([*argv, "--renormalize"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --renormalize:") and "no gradient" in proc.stderr
    assert not (tmp_path / "s").exists()
