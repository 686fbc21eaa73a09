"""The ranks of a stage: the process group (one process without a launcher is a one-rank world),
and agreement between ranks: every rank learns the same failure, count or total, so that a
failure on one rank stops every rank with the same message."""

from __future__ import annotations

import os
import socket
from collections import Counter

from moetool.io import held_output

# DeepSpeed's CPU backend JIT-builds this op when it first initialises (a minute or more on a
# fresh install, with ninja); only its tensor-parallel inference all-reduce uses it, never
# training, whose collectives go through torch.distributed (gloo) on any number of ranks.
SHM_COMM_OP = "deepspeed_shm_comm"


def ensure_distributed_env() -> None:
    """A single process without a launcher still runs as a one-rank world."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def init_distributed() -> None:
    """Start (or join) the process group through DeepSpeed: gloo on a CPU, NCCL with CUDA. On a
    CPU DeepSpeed's shared-memory op is not built (training does not use it)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed builds the op only if its table of compatible ops (one dict, read on every
        # initialisation, including the one inside deepspeed.initialize) says it can.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if not torch.distributed.is_initialized():
        with held_output("stdout"):  # DeepSpeed's own start-up lines stay out of ours
            deepspeed.init_distributed(
                dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
            )


def collective_device():
    """Where a tensor for a collective must live: NCCL reduces only CUDA tensors, gloo CPU
    ones."""
    import torch

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failures_on_any_rank(message: str | None, rank: int, world: int) -> str | None:
    """Every rank learns whether any rank failed, and the same message: the failed ranks'
    messages, named by rank. One small all-reduce when nothing failed."""
    import torch

    if world == 1:
        return message
    flags = torch.zeros(world, device=collective_device())
    flags[rank] = message is not None
    torch.distributed.all_reduce(flags)
    if not flags.any():
        return None
    return _named_by_rank(message, world)


def _named_by_rank(message: str | None, world: int) -> str:
    """Every rank's message (the failed ranks'), named by rank; every rank must call it."""
    import torch

    messages: list = [None] * world
    torch.distributed.all_gather_object(messages, message)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)


def agree_on_step(
    failure: str | None, next_failure: str | None, next_count: int, rank: int, world: int
) -> tuple[str | None, str | None, int]:
    """A training step's one collective: a single all-reduce tells every rank whether any rank
    failed in this step (``failure``: a non-finite loss, a failed write on rank 0) and whether
    any met a reason to stop in the next step's micro-batches, loaded ahead (``next_failure``:
    a bad sample), and sums ``next_count`` (the next step's skipped samples) over the ranks.
    Each failure comes back on every rank as the same message, the failed ranks' messages named
    by rank (``failures_on_any_rank``'s); gathering them costs more collectives, but only when
    something failed."""
    import torch

    if world == 1:
        return failure, next_failure, next_count
    flags = [0] * (2 * world + 1)
    flags[rank] = failure is not None
    flags[world + rank] = next_failure is not None
    flags[2 * world] = next_count
    agreed = torch.tensor(flags, dtype=torch.long, device=collective_device())
    torch.distributed.all_reduce(agreed)
    totals = agreed.tolist()
    failed, failed_next = any(totals[:world]), any(totals[world : 2 * world])
    failure = _named_by_rank(failure, world) if failed else None
    next_failure = _named_by_rank(next_failure, world) if failed_next else None
    return failure, next_failure, totals[2 * world]


def gather_counts(counts: Counter, world: int) -> Counter:
    """Every rank's counts, summed (once, at the end of the stage)."""
    import torch

    if world == 1:
        return counts
    every: list = [None] * world
    torch.distributed.all_gather_object(every, dict(counts))
    return sum((Counter(c) for c in every), Counter())
