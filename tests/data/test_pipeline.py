"""The training data path: dataset of encoded samples, the resumable seeded sampler,
modality-length grouping, worker processes, bad samples named instead of raised."""

import os

import pytest
import torch
from PIL import Image

from moetool.data.llava_json import Sample
from moetool.data.pipeline import (
    BadSample,
    EncodedDataset,
    StageBatchSampler,
    first_good,
    make_loader,
    modality_length_order,
)
from moetool.data.preprocess import Preprocessor
from moetool.data.templates import get_template
from moetool.models.build import build_processor
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_tokenizer


def text_sample(i, words=3, image=None):
    turns = (("human", ("<image>\n" if image else "") + " ".join(["w"] * words)), ("gpt", "ok"))
    return Sample(f"s{i}", "data.json", (image,) if image else (), turns)


def plain_batches(num_samples, micro, rank, world, seed, epoch):
    """The reference order: one seeded permutation per epoch, global batches cut in turn."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    step = micro * world
    return [
        order[s + rank * micro : s + (rank + 1) * micro]
        for s in range(0, num_samples - step + 1, step)
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_follows_the_seeded_order_and_resumes_mid_epoch(world):
    samples = [text_sample(i) for i in range(50)]
    for rank in range(world):
        sampler = StageBatchSampler(samples, 4, rank, world, seed=5)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            expected = plain_batches(50, 4, rank, world, 5, epoch)
            assert list(sampler) == expected and len(sampler) == len(expected)
            sampler.set_epoch(epoch, start=3)
            assert list(sampler) == expected[3:]
    # Ranks take disjoint micro-batches of each global batch.
    seen = [i for r in range(world) for b in StageBatchSampler(samples, 4, r, world, 5) for i in b]
    assert len(seen) == len(set(seen)) == (50 // (4 * world)) * 4 * world


def test_modality_length_grouping_keeps_each_global_batch_to_one_modality(tmp_path):
    lengths = [(i * 7) % 23 for i in range(40)]
    has_image = [i % 3 == 0 for i in range(40)]
    order = modality_length_order(lengths, has_image, 4, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(40))
    full = [order[i : i + 4] for i in range(0, len(order), 4)]
    complete = [b for b in full if len({has_image[i] for i in b}) == 1]
    assert len(complete) >= len(full) - 2  # at most the two modalities' leftovers mix
    samples = [
        text_sample(i, words=lengths[i], image="x.png" if has_image[i] else None) for i in range(40)
    ]
    sampler = StageBatchSampler(samples, 2, 0, 2, seed=1, group_by_modality_length=True)
    grouped, plain = list(sampler), list(StageBatchSampler(samples, 2, 0, 2, seed=1))
    assert grouped != plain and all(len(b) == 2 for b in grouped)


class WhereAmI(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i]), "worker": info}


def test_num_workers_really_uses_worker_processes():
    samples = [text_sample(i) for i in range(16)]
    sampler = StageBatchSampler(samples, 2, 0, 1, seed=0)
    seen = []

    class Spy(WhereAmI):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "input_ids": torch.tensor([os.getpid(), item["worker"].id])}

    loader = make_loader(Spy(), sampler, pad_token_id=0, num_workers=2)
    for batch, bad in loader:
        assert bad == []
        seen += batch["input_ids"].tolist()
    pids = {pid for pid, _ in seen}
    assert os.getpid() not in pids and len(pids) == 2
    assert {worker for _, worker in seen} == {0, 1}


@pytest.fixture(scope="module")
def preprocessor():
    recipe = load_recipe(recipes_root() / "tiny/qwen2.toml")
    processor = build_processor(recipe.vision, build_tokenizer(512, "qwen"))
    return Preprocessor(processor, get_template("qwen"), image_tokens=16, max_length=64)


def test_bad_samples_come_back_named_not_raised(preprocessor, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # a small file whose header claims 400 Mpx
    samples = [
        text_sample(0, image=good),
        text_sample(1, image=truncated),
        text_sample(2, image=bomb),
        text_sample(3, words=200),  # max_length 64 cuts the whole answer off
    ]
    items = [EncodedDataset(samples, preprocessor)[i] for i in range(4)]
    assert "input_ids" in items[0]
    assert [type(x) for x in items[1:]] == [BadSample] * 3
    assert [x.reason for x in items[1:]] == [
        "unreadable image",
        "image too large",
        "no answer left (every label masked)",
    ]
    assert all(x.where == f"data.json, sample 's{i}'" for i, x in enumerate(items[1:], 1))


def test_grouping_keeps_each_optimizer_step_to_one_modality_under_accumulation():
    """Micro-batch 2 x world 2 x accumulation 2: the global batch of 8 that one optimizer step
    trains on holds one modality (LLaVA groups global batches), not only each micro-step."""
    has_image = [i % 3 != 0 for i in range(96)]
    samples = [
        text_sample(i, words=i % 11 + 1, image="x.png" if has_image[i] else None) for i in range(96)
    ]
    ranks = [list(StageBatchSampler(samples, 2, r, 2, 3, True, global_batch=8)) for r in (0, 1)]
    steps = [
        [i for r in (0, 1) for m in (2 * s, 2 * s + 1) for i in ranks[r][m]]
        for s in range(len(ranks[0]) // 2)
    ]
    mixed = [s for s in steps if len({has_image[i] for i in s}) > 1]
    assert len(steps) == 12 and len(mixed) <= 1  # at most the leftovers of the two modalities
    with pytest.raises(ValueError, match="not a multiple"):
        StageBatchSampler(samples, 2, 0, 2, 3, True, global_batch=6)


def test_lookahead_starts_at_the_ranks_micro_batch_and_covers_every_sample():
    samples = [text_sample(i) for i in range(30)]
    for rank in (0, 1):
        sampler = StageBatchSampler(samples, 3, rank, 2, seed=4)
        sampler.set_epoch(1)
        batches = list(sampler)
        for micro in (0, 2, 4):
            ahead = sampler.lookahead(1, micro)
            assert ahead[:3] == batches[micro] and sorted(ahead) == list(range(30))
        assert list(sampler) == batches  # looking ahead changes nothing the sampler yields


def test_first_good_skips_bad_samples_and_says_when_none_is_good(preprocessor, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    samples = [text_sample(i, image=truncated) for i in range(3)] + [text_sample(3, image=good)]
    dataset = EncodedDataset(samples, preprocessor)
    item = first_good(dataset, [2, 0, 3, 1])
    assert torch.equal(item["input_ids"], dataset[3]["input_ids"])
    assert first_good(dataset, [0, 1, 2]) is None
