"""The training data path: a map-style dataset of encoded samples, a seeded distributed batch
sampler that resumes mid-epoch (with optional modality-length grouping, as LLaVA's
``group_by_modality_length``), and a torch ``DataLoader`` with worker processes.

A sample that cannot be encoded (unreadable or oversized image, every label masked, image tokens
cut by ``max_length``) never raises inside a worker: the dataset returns a ``BadSample`` naming
it, and the training loop decides — skip and count it (``data.skip_bad_samples``) or stop every
rank with its name. A micro-batch with no good sample left is passed over by a zero-weight pass
(the ranks stay in step); ``first_good`` finds the good sample that pass runs on when the rank
has met none yet, without changing the sampler's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from moetool.data.llava_json import DataError, Sample
from moetool.data.preprocess import collate, collate_packed


@dataclass(frozen=True)
class BadSample:
    """A sample the dataset could not encode: ``where`` names file and sample, ``reason`` is a
    short kind (for the counts) and ``message`` the full error."""

    where: str
    reason: str
    message: str


def reason_of(message: str) -> str:
    """A short, countable kind of a data error message."""
    for needle, reason in (
        ("every label is masked", "no answer left (every label masked)"),
        ("cuts into the image tokens", "image tokens cut by max_length"),
        ("too large", "image too large"),
        ("unreadable", "unreadable image"),
    ):
        if needle in message:
            return reason
    return "malformed sample"


class EncodedDataset(torch.utils.data.Dataset):
    """Item ``i``: sample ``i`` encoded by ``preprocessor`` (a dict of tensors), or a
    ``BadSample``."""

    def __init__(self, samples: Sequence[Sample], preprocessor):
        self.samples = samples
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            return self.preprocessor.encode(sample)
        except DataError as err:
            return BadSample(sample.where, reason_of(str(err)), str(err))


def first_good(dataset: EncodedDataset, indices: Sequence[int]):
    """The first of ``indices`` whose sample encodes (its encoded item), or ``None`` when none
    does. Bad samples met on the way are not counted: they are counted when training meets
    them."""
    for index in indices:
        item = dataset[index]
        if not isinstance(item, BadSample):
            return item
    return None


def text_length(sample: Sample) -> int:
    """A cheap length for grouping (words, as LLaVA's ``modality_lengths``)."""
    return sum(len(value.split()) for _, value in sample.turns)


def modality_length_order(
    lengths: Sequence[int], has_image: Sequence[bool], global_batch: int, generator
) -> list[int]:
    """A permutation of the samples in which every ``global_batch`` holds one modality and
    samples of similar length (LLaVA's modality-length grouping): each modality is shuffled, cut
    into global batches sorted by length, and the global batches of both are shuffled together
    (the incomplete ones last)."""
    groups = []
    leftovers = []
    for modality in (True, False):
        members = [i for i, m in enumerate(has_image) if m is modality]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        # Mega-batches of 50 global batches are sorted by length, then cut into global batches.
        mega = global_batch * 50
        for start in range(0, len(shuffled), mega):
            chunk = sorted(shuffled[start : start + mega], key=lambda i: -lengths[i])
            for b in range(0, len(chunk), global_batch):
                batch = chunk[b : b + global_batch]
                (groups if len(batch) == global_batch else leftovers).append(batch)
    order = torch.randperm(len(groups), generator=generator).tolist()
    return [i for g in order for i in groups[g]] + [i for batch in leftovers for i in batch]


class StageBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches of one epoch, in a seeded order that every rank and every
    resumed run computes alike: global batch ``g`` of the epoch's order is
    ``order[g * B : (g + 1) * B]`` (B = micro-batch x world), and rank r takes its r-th
    micro-batch. ``set_epoch(epoch, start)`` picks the epoch and skips the first ``start``
    micro-batches (what a resumed run already trained on) without loading them.

    With ``group_by_modality_length`` every ``global_batch`` (one optimizer step: micro-batch x
    world x accumulation; default one micro-batch per rank) holds one modality, as LLaVA groups
    its global batches."""

    def __init__(
        self,
        samples: Sequence[Sample],
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        group_by_modality_length: bool = False,
        global_batch: int | None = None,
    ):
        self.num_samples = len(samples)
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world, seed
        self.global_batch = global_batch or micro_batch * world
        if self.global_batch % (micro_batch * world):
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of micro-batch "
                f"{micro_batch} x world {world}"
            )
        self.group = group_by_modality_length
        if self.group:
            self.lengths = [text_length(s) for s in samples]
            self.has_image = [bool(s.images) for s in samples]
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        if self.group:
            return modality_length_order(self.lengths, self.has_image, self.global_batch, g)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def lookahead(self, epoch: int, micro_step: int) -> list[int]:
        """Every sample, beginning with this rank's micro-batch ``micro_step`` of ``epoch`` and
        going on in the epoch's order (then from its start): where a rank looks for a good
        sample to stand in for a micro-batch with none. The order itself is unchanged."""
        order = self.order(epoch)
        first = micro_step * self.micro_batch * self.world + self.rank * self.micro_batch
        return order[first:] + order[:first]

    def __len__(self) -> int:
        return self.num_samples // (self.micro_batch * self.world) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        step = self.micro_batch * self.world
        full = self.num_samples // step
        for g in range(self.start, full):
            first = g * step + self.rank * self.micro_batch
            yield order[first : first + self.micro_batch]


def batch_tokens(batch: dict) -> int:
    """The tokens a collated batch trains on (for tokens/s), counted on the host before the
    batch moves to the device, so no device sync: its ``attention_mask``'s ones when it has
    one (padding excluded), else every position of ``input_ids`` (a padding-free packed batch
    has no mask and no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class Collate:
    """Pads (``collate``) or packs (``collate_packed``) the good items of a micro-batch, or
    (``features``) pads a whole VLM's processor outputs (``data.chat.collate_features``); bad
    ones are handed on by name."""

    def __init__(self, pad_token_id: int, packing: bool = False, features: bool = False):
        self.pad_token_id, self.packing, self.features = pad_token_id, packing, features

    def batch(self, good: list[dict]) -> dict:
        if self.features:
            from moetool.data.chat import collate_features

            return collate_features(good, self.pad_token_id)
        return collate_packed(good) if self.packing else collate(good, self.pad_token_id)

    def __call__(self, items: list) -> tuple[dict | None, list[BadSample]]:
        bad = [x for x in items if isinstance(x, BadSample)]
        good = [x for x in items if not isinstance(x, BadSample)]
        return (self.batch(good) if good else None), bad


def make_loader(
    dataset: EncodedDataset,
    sampler: StageBatchSampler,
    pad_token_id: int,
    num_workers: int,
    pin_memory: bool = False,
    packing: bool = False,
    features: bool = False,
) -> torch.utils.data.DataLoader:
    """``DataLoader`` over ``sampler``'s micro-batches, padded or (``packing``) packed (a whole
    VLM's processor outputs: ``features``):
    ``num_workers`` worker processes that stay alive across epochs and prefetch two
    micro-batches each (0 = in this process)."""
    extra = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collate(pad_token_id, packing, features),
        pin_memory=pin_memory,
        **extra,
    )
