"""Packing is exact: a packed micro-batch (``collate_packed``) gives the loss, the router losses
and every gradient of the same samples padded (``collate``), for every supported family, dense
and sparse, image and text-only samples mixed (fp32), under transformers' attention and under
moetool's per-sample sdpa (``models/packed_attention.py``)."""

import pytest
import torch

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.data.preprocess import IGNORE_INDEX, collate, collate_packed
from moetool.models.build import save_checkpoint
from moetool.models.families import known_families
from moetool.models.moe.config import MoEConfig
from moetool.models.packed_attention import use_packed_sdpa
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm
from moetool.upcycle import upcycle_checkpoint

TOLERANCE = 1e-5
PAD = 0


def encoded_items(config, seed=0) -> list[dict]:
    """Four encoded samples of different lengths, as ``Preprocessor.encode`` returns them:
    two with an image (its tokens expanded), two text-only; labels on the second half, but on
    every token of the second sample (its first label is no target when padded, and must not
    become one of the previous sample when packed)."""
    g = torch.Generator().manual_seed(seed)
    image_tokens, size = config.image_seq_length, config.vision_config.image_size
    items = []
    for length, with_image in (
        (image_tokens + 30, True),
        (17, False),
        (image_tokens + 9, True),
        (41, False),
    ):
        ids = torch.randint(20, config.text_config.vocab_size, (length,), generator=g)
        labels = ids.clone()
        if length != 17:  # one sample is labelled from its first token on (no boundary leak)
            labels[: length // 2] = IGNORE_INDEX
        item = {}
        if with_image:
            ids[1 : 1 + image_tokens] = config.image_token_id
            labels[: 1 + image_tokens] = IGNORE_INDEX
            item["pixel_values"] = torch.randn(1, 3, size, size, generator=g)
        items.append({**item, "input_ids": ids, "labels": labels})
    return items


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    aux = getattr(out, "aux_loss", None)
    return out.loss.detach(), (None if aux is None else aux.detach()), grads


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the dense tiny LLaVA and its upcycled sparse model (experts made to differ
    by Drop-Upcycling, z-loss on), both fp32 in training mode."""
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("packing")
    out = {}
    for family in known_families():
        recipe = load_recipe(recipes_root() / f"tiny/{family}.toml")
        dense, processor = build_random_lvlm(recipe, seed=1)
        save_checkpoint(dense, processor, root / family / "dense")
        moe = MoEConfig(drop_upcycling=0.5, z_loss_coef=1e-3)
        upcycle_checkpoint(root / family / "dense", root / family / "sparse", moe, seed=1)
        sparse = AutoModelForImageTextToText.from_pretrained(root / family / "sparse")
        out[family] = {"dense": dense.float().train(), "sparse": sparse.float().train()}
    return out


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("family", known_families())
def test_packed_micro_batch_equals_the_padded_one(models, family, kind):
    """Under transformers' attention (a block-diagonal mask over the row) and under moetool's
    per-sample sdpa (what training runs on packed rows where the family runs sdpa)."""
    model = models[family][kind]
    items = encoded_items(model.config)
    loss, aux, grads = loss_and_grads(model, collate(items, PAD))
    runs = [loss_and_grads(model, collate_packed(items))]
    try:
        if use_packed_sdpa(model):
            runs.append(loss_and_grads(model, collate_packed(items)))
            # rows that are not packed go through plain sdpa unchanged
            assert max_diff(grads, loss_and_grads(model, collate(items, PAD))[2]) == 0
    finally:
        model.set_attn_implementation({"text_config": "eager" if family == "gemma2" else "sdpa"})
    assert len(runs) == (1 if family == "gemma2" else 2)  # gemma2 runs eager in transformers
    for packed_loss, packed_aux, packed_grads in runs:
        assert abs(loss - packed_loss) <= TOLERANCE
        if kind == "sparse":  # the router losses count the same (real) tokens
            assert abs(aux - packed_aux) <= TOLERANCE
        assert max_diff(grads, packed_grads) <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_comparison_catches_a_wrong_mask_or_wrong_positions(models, family):
    """The tolerance above tells a right packing from a wrong one: positions that run on across
    samples, or a mask that lets samples see each other, change loss and gradients."""
    model = models[family]["sparse"]
    items = encoded_items(model.config)
    loss, _, grads = loss_and_grads(model, collate(items, PAD))
    packed = collate_packed(items)
    running = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    see_all = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
    for wrong in (running, see_all):
        wrong_loss, _, wrong_grads = loss_and_grads(model, wrong)
        assert (
            abs(loss - wrong_loss) > 100 * TOLERANCE
            or max_diff(grads, wrong_grads) > 100 * TOLERANCE
        )
