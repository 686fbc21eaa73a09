"""Routing capture and statistics on a tiny sparse model: E=8, top-2, a non-interval layout,
16 image tokens per image."""

import pytest
import torch

import moetool  # noqa: F401
from moetool.models.build import save_checkpoint
from moetool.models.moe.config import MoEConfig
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.routing.capture import RoutingCapture, capture_routing
from moetool.routing.stats import balance, expert_load, modality_share, top_pathways
from moetool.tiny import build_random_lvlm
from moetool.upcycle import upcycle_checkpoint

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("routing")
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/llama.toml"))
    save_checkpoint(model, processor, root / "dense")
    upcycle_checkpoint(
        root / "dense",
        root / "moe",
        MoEConfig(num_experts=8, top_k=2, layers=(1, 2), router_std=1.0),
    )
    return AutoModelForImageTextToText.from_pretrained(root / "moe").eval()


def batches(model, n=3, batch=2, length=30):
    config = model.config
    out = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(20, 500, (batch, length), generator=g)
        ids[:, 1 : 1 + config.image_seq_length] = config.image_token_id
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0  # padding is left out of the statistics
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
            }
        )
    return out


def test_loads_sum_to_one_and_match_an_independent_count(sparse, tmp_path):
    data = batches(sparse)
    counts = {layer: torch.zeros(8) for layer in LAYERS}
    hooks = []
    current = {}
    for layer in LAYERS:
        block = sparse.model.language_model.layers[layer].mlp

        def hook(module, inputs, output, layer=layer):
            # Recompute the routing from the block's input and the router weights.
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            logits = hidden @ module.router.weight.float().t()
            top1 = logits.argmax(-1)[current["mask"]]
            counts[layer] += torch.bincount(top1, minlength=8).float()

        hooks.append(block.register_forward_hook(hook))
    try:
        for batch in data:
            current["mask"] = batch["attention_mask"].reshape(-1).bool()
            with torch.no_grad():
                sparse(**batch)
    finally:
        for h in hooks:
            h.remove()

    capture = capture_routing(sparse, data)
    assert capture.layers == LAYERS and capture.num_experts == 8 and capture.top_k == 2
    valid = sum(int(b["attention_mask"].sum()) for b in data)
    assert len(capture.records) == valid * 2 * len(LAYERS)
    images = capture.records[(capture.records["layer"] == 1) & (capture.records["rank"] == 0)]
    assert (images["modality"] == "image").sum() == len(data) * 2 * 16
    load = expert_load(capture)
    assert list(load.index) == LAYERS and list(load.columns) == list(range(8))
    assert torch.allclose(
        torch.tensor(load.sum(axis=1).to_numpy()), torch.ones(2, dtype=torch.float64)
    )
    assert torch.allclose(
        torch.tensor(expert_load(capture, top1=False).sum(axis=1).to_numpy()),
        torch.ones(2, dtype=torch.float64),
    )
    for layer in LAYERS:
        expected = counts[layer] / counts[layer].sum()
        assert torch.allclose(
            torch.tensor(load.loc[layer].to_numpy(), dtype=torch.float32), expected, atol=1e-6
        )
    capture.save(tmp_path / "cap")
    again = RoutingCapture.load(tmp_path / "cap")
    assert again.layers == LAYERS and len(again.records) == len(capture.records)
    b = balance(capture)
    assert (b["cv"] >= 0).all() and ((b["entropy"] > 0) & (b["entropy"] <= 1 + 1e-9)).all()
    paths = top_pathways(capture, n=5)
    assert len(paths) <= 5 and all(len(p) == 2 for p in paths["pathway"])
    assert paths["share"].is_monotonic_decreasing


def test_constructed_routers_send_image_tokens_to_one_expert(sparse):
    import copy

    model = copy.deepcopy(sparse)
    c = 50.0
    with torch.no_grad():
        # Hidden dimension 0 marks the modality: +c for image tokens, -c for text tokens.
        model.model.multi_modal_projector.linear_2.bias[0] = c
        model.model.language_model.embed_tokens.weight[:, 0] = -c
        for layer in LAYERS:
            router = model.model.language_model.layers[layer].mlp.router.weight
            router.zero_()
            router[3, 0] = 1.0  # image tokens -> expert 3
            router[5, 0] = -1.0  # text tokens -> expert 5
    capture = capture_routing(model, batches(model))
    share = modality_share(capture, top1=True)
    load = expert_load(capture)
    for layer in LAYERS:
        assert share.loc[(layer, 3), "image"] == 1.0
        assert share.loc[(layer, 5), "text"] == 1.0
        assert load.loc[layer, [3, 5]].sum() == pytest.approx(1.0)
    image_paths = top_pathways(capture, modality="image")
    assert image_paths.iloc[0]["pathway"] == (3, 3) and image_paths.iloc[0]["share"] == 1.0


def test_plots_are_written_and_open_as_images(sparse, tmp_path):
    from PIL import Image

    from moetool.routing.plots import plot_all

    paths = plot_all(capture_routing(sparse, batches(sparse, n=1)), tmp_path / "fig")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{n}.{e}" for n in ("expert_load", "modality", "pathways") for e in ("png", "svg")
    )
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.size[0] > 100 and image.size[1] > 100
        else:
            assert path.read_text().lstrip().startswith("<?xml")
