"""Top-k routing (Eq. 5-6) and expert capacity with Batch Priority Routing (appendix B.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Routing decisions for T tokens over E experts."""

    probs: torch.Tensor  # (T, E) fp32 softmax of the router logits (Eq. 5)
    expert_index: torch.Tensor  # (T, k) chosen experts, best first
    combine_weight: torch.Tensor  # (T, k) fp32 weights applied to the experts' outputs
    keep: torch.Tensor | None = None  # (T, k) bool: False where capacity dropped the assignment


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """Slots per expert: ceil(k * tokens * capacity_factor / E), at least ``min_capacity``."""
    return max(math.ceil(top_k * num_tokens * capacity_factor / num_experts), min_capacity)


def batch_priority_keep(
    expert_index: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Batch Priority Routing (Riquelme et al. 2021): tokens sorted by ``priority`` (their top
    routing weight) claim expert slots first, and every first choice is placed before any second
    choice. Returns a (T, k) mask of the assignments that got a slot."""
    num_tokens, top_k = expert_index.shape
    order = torch.argsort(priority, descending=True, stable=True)
    # Assignments in claim order: choice rank major, token priority minor.
    claims = expert_index[order].t().reshape(-1)
    one_hot = F.one_hot(claims, num_experts)
    slot = (one_hot.cumsum(0) - 1).gather(1, claims.unsqueeze(1)).squeeze(1)
    granted = (slot < capacity).view(top_k, num_tokens).t()
    keep = torch.empty_like(granted)
    keep[order] = granted
    return keep


def route(
    router_logits: torch.Tensor,
    top_k: int,
    normalize: bool = True,
    capacity: int | None = None,
) -> Routing:
    """Softmax over experts, top-k, combine weights; with ``capacity``, Batch Priority Routing.

    ``normalize`` renormalises the top-k probabilities to sum to 1 (DeepSpeed top-2, Mixtral;
    makes upcycling exact); otherwise the raw softmax probabilities of Eq. 6 are the weights.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    top_probs, expert_index = probs.topk(top_k, dim=-1)
    weights = top_probs / top_probs.sum(-1, keepdim=True) if normalize else top_probs
    keep = None
    if capacity is not None:
        keep = batch_priority_keep(expert_index, top_probs[:, 0], probs.shape[-1], capacity)
    return Routing(probs, expert_index, weights, keep)
