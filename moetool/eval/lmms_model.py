"""lmms-eval model class for moetool checkpoints (dense and sparse): batched greedy generation
with the KV cache, the checkpoint's chat template and its image preprocessing; one shard of the
samples per rank when launched by torchrun (or accelerate)."""

from __future__ import annotations

import os

import torch
from lmms_eval import utils
from lmms_eval.api.model import lmms

from moetool.eval.tasks import EVAL_DTYPES
from moetool.models.inference import (  # noqa: F401  (re-exported for lmms-eval users)
    answer,
    build_prompt,
    load_checkpoint,
    training_aspect_ratio,
)

# The dtypes a checkpoint is evaluated in, by `moetool eval --dtype`'s names and torch's (what
# lmms-eval's `--model_args dtype=` passes).
DTYPES = {**EVAL_DTYPES, **{name: name for name in EVAL_DTYPES.values()}}


def launch_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate set them; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def rank_device(device: str, world_size: int, local_rank: int) -> str:
    """The device of this rank: under a multi-rank launch ``cuda`` means the rank's own GPU
    (``cuda:LOCAL_RANK``); a single numbered GPU would put every rank on it."""
    if world_size == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(
            f"--device {device}: with {world_size} ranks pass --device cuda (each rank takes "
            "cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return f"cuda:{local_rank}"


def join_process_group(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process; under a multi-rank launch, the process group
    joined (NCCL on GPUs, gloo on CPUs) if nobody has yet, for lmms-eval's request counts,
    padding and the gather of answers to rank 0."""
    rank, world_size, local_rank = launch_world()
    device = rank_device(device, world_size, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return rank, world_size, device


class MoeTool(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size=1,
        dtype="float32",
        attn_implementation: str | None = None,  # None: the checkpoint's own
        **kwargs,
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self._rank, self._world_size, device = join_process_group(device)
        self.model, self.processor = load_checkpoint(
            pretrained, DTYPES[dtype], device, attn_implementation
        )
        self.device_name = device
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        self.aspect_ratio = training_aspect_ratio(self.model.config)

    @property
    def device(self) -> torch.device:
        """Where lmms-eval's evaluator puts its request counts for the gather across ranks."""
        return self._device

    def clean(self):
        """Keep the model across evaluations (lmms-eval's default deletes every module)."""

    def generate_until(self, requests) -> list[str]:
        # Longest prompts first, batched by generation settings. Batches are left-padded with an
        # attention mask (the processor's tokenizer pads on the left; generate takes position
        # ids from the mask), so a sample's answer does not depend on its batch.
        collator = utils.Collator(
            [r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True
        )
        answers: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, gen_kwargs, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            kwargs = dict(gen_kwargs[0])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = [
                [v for v in visual(self.task_dict[task][split][doc_id]) if v is not None]
                for visual, doc_id, task, split in zip(
                    to_visual, doc_ids, tasks, splits, strict=True
                )
            ]
            texts = answer(
                self.model,
                self.processor,
                contexts,
                images,
                max_new_tokens=int(kwargs.get("max_new_tokens", 128)),
                num_beams=int(kwargs.get("num_beams") or 1),  # greedy, whatever the temperature
                device=self.device_name,
            )
            for text in texts:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(text.strip())
        return collator.get_original(answers)

    def loglikelihood(self, requests):
        raise NotImplementedError("moetool evaluates generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("moetool evaluates single-round tasks only")
