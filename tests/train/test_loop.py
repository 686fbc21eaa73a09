"""The training loop in-process on a one-rank gloo world: ``setup_stage`` + ``train`` on a tiny
recipe give golden step losses (recorded from the loop before it was split into the two), with
gradient accumulation, MoE aux loss and a zero-weight pass over an all-bad micro-batch."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from moetool.data.pipeline import StageBatchSampler, batch_tokens
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.train.ranks import agree_on_step

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SAMPLES = 16  # 4 optimizer steps of 4 (2 micro-batches of 2 on one rank)
SEED = 42  # the tiny recipes' stage seed


def write_data(root: Path) -> None:
    """Questions about one-colour images (as tests/integration/conftest.py's colour world)."""
    (root / "data/img").mkdir(parents=True)
    names = list(COLOURS)
    questions = []
    for i in range(SAMPLES):
        colour = names[i % len(names)]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(root / f"data/img/{i}.png")
        questions.append(
            {
                "id": f"q{i}",
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the image?"},
                    {"from": "gpt", "value": colour.capitalize() + "."},
                ],
            }
        )
    (root / "data/stage3.json").write_text(json.dumps(questions))


def tiny_recipe():
    return load_recipe(
        recipes_root() / "tiny/llama.toml",
        [
            "stages.moe_tune.max_steps=3",
            "data.num_workers=0",
            "data.skip_bad_samples=true",
        ],
    )


def dense_start(recipe, root: Path) -> Path:
    """A random dense tiny LVLM saved as a checkpoint: stage III upcycles it on the fly."""
    from moetool.tiny import build_random_lvlm

    model, processor = build_random_lvlm(recipe, seed=SEED)
    model.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    return root / "dense"


def corrupt_micro_batch(root: Path, micro: int) -> None:
    """Truncate both images of one-rank micro-batch ``micro`` of epoch 0: it is all bad."""
    order = StageBatchSampler([None] * SAMPLES, 2, 0, 1, SEED).order(0)
    for i in order[2 * micro : 2 * micro + 2]:
        png = root / f"data/img/{i}.png"
        png.write_bytes(png.read_bytes()[:40])


@pytest.fixture
def one_rank_world(monkeypatch):
    """The launcher's variables for a one-rank world, undone (with the process group) after."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


# Recorded once from run_stage as it was before setup_stage/train (commit d64029a), on these
# inputs: (loss, lm_loss, aux_loss per layer, lr, skipped) per step.
GOLDEN = [
    (6.1313018798828125, 6.110603332519531, 1.0349252820014954, 2e-4, 0),
    (3.0288710594177246, 3.018650531768799, 0.5110296010971069, 1e-4, 2),  # one pass weighs 0
    (6.066859483718872, 6.046049118041992, 1.0405268669128418, 0.0, 0),
]


def test_train_gives_the_golden_step_losses(tmp_path, one_rank_world):
    """Stage III on an upcycled tiny llama, 3 steps of 2 micro-batches; step 2's second
    micro-batch is all bad and skipped (a zero-weight pass over the last good one)."""
    from moetool.train.runner import StageParts, setup_stage, train

    write_data(tmp_path)
    recipe = tiny_recipe()
    init = dense_start(recipe, tmp_path)
    corrupt_micro_batch(tmp_path, 3)
    parts = setup_stage(recipe, "moe_tune", tmp_path / "run", init=init, recipe_dir=tmp_path)
    assert isinstance(parts, StageParts)
    assert (parts.micro_steps, parts.total_steps, parts.aux_layers) == (2, 3, 2)
    steps = []
    result = train(parts, on_step=steps.append)

    seen = [(m.loss, m.lm_loss, m.aux_loss, m.lr, m.skipped) for m in steps]
    for got, want in zip(seen, GOLDEN, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12)
    assert [m.step for m in steps] == [1, 2, 3] and all(m.tokens_per_s > 0 for m in steps)
    assert result.steps == 3 and result.skipped == {"unreadable image": 2}
    assert (result.loss_first, result.loss_last) == (seen[0][0], seen[-1][0])
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert [r["loss"] for r in rows] == [m.loss for m in steps]
    assert (tmp_path / "run/moe_tune/config.json").is_file()


def test_batch_tokens_counts_unpadded_tokens_or_every_position_of_a_packed_batch():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == 5
    assert batch_tokens({"input_ids": torch.zeros(1, 7)}) == 7  # packed: no mask, no padding


# Per rank: (failure in this step, failure in the next step's micro-batches, next skipped).
CASES = {
    "nothing": [(None, None, 2), (None, None, 1)],
    "nan on rank 1": [(None, None, 0), ("non-finite loss (nan) at step 2", None, 0)],
    "both": [("could not write m", "bad q5", 1), (None, "bad q9", 0)],
}


def _agree_worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    real_all_reduce, real_gather = dist.all_reduce, dist.all_gather_object
    dist.all_reduce = lambda *a, **k: calls.append("all_reduce") or real_all_reduce(*a, **k)
    dist.all_gather_object = lambda *a, **k: calls.append("gather") or real_gather(*a, **k)
    try:
        for name, per_rank in CASES.items():
            calls.clear()
            out[(name, rank)] = (agree_on_step(*per_rank[rank], rank, 2), list(calls))
    finally:
        dist.all_reduce, dist.all_gather_object = real_all_reduce, real_gather
        dist.destroy_process_group()


def test_one_all_reduce_agrees_a_step_on_every_rank(tmp_path):
    """Nothing failed: one all-reduce and nothing else, the skipped counts summed. A failure
    on any rank: the same messages on both ranks, named by rank (gathered only then)."""
    out = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[("nothing", rank)] == ((None, None, 3), ["all_reduce"])
        assert out[("nan on rank 1", rank)] == (
            ("rank 1: non-finite loss (nan) at step 2", None, 0),
            ["all_reduce", "gather"],
        )
        assert out[("both", rank)] == (
            ("rank 0: could not write m", "rank 0: bad q5; rank 1: bad q9", 1),
            ["all_reduce", "gather", "gather"],
        )
    # One rank: no collective; the messages as they are.
    assert agree_on_step("x", None, 4, 0, 1) == ("x", None, 4)
