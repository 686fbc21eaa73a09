"""Agreement between ranks: every rank learns the same failure, count or total, so that a
failure on one rank stops every rank with the same message."""

from __future__ import annotations

import os
import socket
from collections import Counter


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
    messages: list = [None] * world
    torch.distributed.all_gather_object(messages, message)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)


def sum_over_ranks(count: int, world: int) -> int:
    import torch

    if world == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=collective_device())
    torch.distributed.all_reduce(total)
    return int(total.item())


def gather_counts(counts: Counter, world: int) -> Counter:
    """Every rank's counts, summed (once, at the end of the stage)."""
    import torch

    if world == 1:
        return counts
    every: list = [None] * world
    torch.distributed.all_gather_object(every, dict(counts))
    return sum((Counter(c) for c in every), Counter())
