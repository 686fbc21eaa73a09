"""The lmms-eval plugin's answers do not depend on the batch (left padding, an attention mask,
position ids from the mask), and the checkpoint runs in the dtype asked for."""

from __future__ import annotations

import types

import pytest
import torch
from PIL import Image

from moetool.eval.lmms_model import MoeTool, rank_device

QUESTIONS = [
    "Is there a red circle?",
    "What colour is the large shape in the middle of the image? Answer with one word, please.",
    "Describe.",
    "How many shapes are there in the picture, counting the small ones as well?",
    "Why?",
]
# Wide, tall and square images, and one text-only question.
IMAGES = [(40, 20), (20, 30), None, (24, 24), (50, 16)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random sparse checkpoint (pad-trained: the default)."""
    from moetool.models.build import save_checkpoint
    from moetool.models.moe.config import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    root = tmp_path_factory.mktemp("batching")
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/qwen2.toml"))
    save_checkpoint(model, processor, root / "dense")
    upcycle_checkpoint(root / "dense", root / "moe", MoEConfig())
    return root / "moe"


def requests(count: int):
    """lmms-eval requests (``args`` as its generate_until passes them) and their documents."""
    docs = [
        {"image": None if size is None else Image.new("RGB", size, (40 * i, 200 - 30 * i, 90))}
        for i, size in enumerate(IMAGES[:count])
    ]
    gen = {"max_new_tokens": 10, "temperature": 0.0, "until": []}
    reqs = [
        types.SimpleNamespace(
            args=(QUESTIONS[i], dict(gen), lambda doc: [doc["image"]], i, "task", "test")
        )
        for i in range(count)
    ]
    return reqs, {"task": {"test": docs}}


def answers(plugin: MoeTool, batch_size: int, count: int = len(QUESTIONS)) -> list[str]:
    reqs, plugin.task_dict = requests(count)
    plugin.batch_size = batch_size
    return plugin.generate_until(reqs)


def test_batched_answers_equal_one_at_a_time(checkpoint):
    plugin = MoeTool(pretrained=str(checkpoint))
    alone = answers(plugin, 1)
    assert len(set(alone)) > 1  # the answers tell the samples apart
    assert answers(plugin, 3) == alone
    assert answers(plugin, len(QUESTIONS)) == alone


def test_left_padded_rows_take_their_positions_from_the_mask(checkpoint):
    """Under left padding each row's first real token is at position 0, as alone."""
    plugin = MoeTool(pretrained=str(checkpoint))
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("past_key_values") is None or not seen:
            seen.append((kwargs["position_ids"].clone(), kwargs["attention_mask"].clone()))

    language_model = plugin.model.model.language_model
    handle = language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        answers(plugin, 3, count=3)
    finally:
        handle.remove()
    positions, mask = seen[0]
    assert positions.shape[0] == 3 and not mask.all()  # a padded batch
    for row, row_mask in zip(positions, mask, strict=True):
        real = row[row_mask.bool()]
        assert real.tolist() == list(range(len(real)))
        assert row_mask[-1] == 1  # padding on the left


def test_the_checkpoint_runs_in_the_dtype_asked_for(checkpoint):
    plugin = MoeTool(pretrained=str(checkpoint), dtype="bf16")
    assert {p.dtype for p in plugin.model.parameters()} == {torch.bfloat16}
    assert len(answers(plugin, 2, count=2)) == 2
    assert MoeTool(pretrained=str(checkpoint), dtype="float32").model.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        MoeTool(pretrained=str(checkpoint), dtype="fp16")


def test_each_rank_takes_its_own_gpu():
    assert rank_device("cuda", world_size=1, local_rank=0) == "cuda"
    assert rank_device("cuda:3", world_size=1, local_rank=0) == "cuda:3"
    assert rank_device("cuda", world_size=8, local_rank=5) == "cuda:5"
    assert rank_device("cpu", world_size=2, local_rank=1) == "cpu"
    with pytest.raises(ValueError, match="--device cuda"):
        rank_device("cuda:0", world_size=2, local_rank=1)


@pytest.mark.parametrize("base", ["qwen3_vl", "llava_onevision", "idefics3", "gemma3", "mistral3"])
def test_a_base_answers_alike_batched_or_alone(base):
    """Bases with their own chat templates and processors (dynamic resolution, tiles, image
    sizes, token types): each prompt's own images, text-only prompts mixed in, left padding."""
    from moetool.models.inference import answer
    from moetool.tiny_vlm import build_random_vlm

    model, processor = build_random_vlm(base, seed=3, num_layers=2)
    docs = requests(4)[1]["task"]["test"]
    images = [[d["image"]] if d["image"] is not None else [] for d in docs]

    def ask(indices):
        return answer(
            model,
            processor,
            [QUESTIONS[i] for i in indices],
            [images[i] for i in indices],
            max_new_tokens=6,
            generate_kwargs={"min_new_tokens": 6},
        )

    alone = [ask([i])[0] for i in range(4)]
    assert ask(range(4)) == alone
