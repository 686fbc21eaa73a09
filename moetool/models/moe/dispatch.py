"""Sort-by-expert dispatch: each expert runs once on a contiguous slice of its tokens."""

from __future__ import annotations

import torch
from torch import nn


def dispatch_combine(
    hidden: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    experts: nn.ModuleList,
    keep: torch.Tensor | None = None,
    skip_empty: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_j combine_weight[t, j] * experts[expert_index[t, j]](hidden[t])``.

    Assignments are sorted by expert so that every expert module is called once on a
    contiguous block (one GEMM per projection per expert); results are weighted and summed back
    with one index_add. Dropped assignments (``keep`` False) contribute nothing. Every expert is
    called, with an empty block if it got no tokens, so all parameters stay in the graph (and
    every rank takes part in ZeRO-3's parameter gathering); ``skip_empty`` leaves experts without
    tokens out, for inference where neither matters (one decoded token reaches k of E experts,
    which are then called directly).
    """
    num_tokens, top_k = expert_index.shape
    if skip_empty and num_tokens == 1:
        return _one_token(hidden, expert_index, combine_weight, experts, keep)
    flat_expert = expert_index.reshape(-1)
    flat_token = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)
    flat_weight = combine_weight.reshape(-1)
    if keep is not None:
        kept = keep.reshape(-1)
        flat_expert, flat_token, flat_weight = (
            flat_expert[kept],
            flat_token[kept],
            flat_weight[kept],
        )
    order = torch.argsort(flat_expert, stable=True)
    sorted_token = flat_token[order]
    counts = torch.bincount(flat_expert, minlength=len(experts)).tolist()
    blocks = hidden.index_select(0, sorted_token).split(counts)
    outputs = [
        expert(block)
        for expert, block, count in zip(experts, blocks, counts, strict=True)
        if count or not skip_empty
    ]
    if not outputs:  # nothing routed (every assignment dropped, or no tokens)
        return torch.zeros_like(hidden)
    expert_out = torch.cat(outputs)
    expert_out = expert_out * flat_weight[order].to(expert_out.dtype).unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, sorted_token, expert_out)


def _one_token(hidden, expert_index, combine_weight, experts, keep) -> torch.Tensor:
    """Decoding one token: its k experts called directly, none of the sort/gather/scatter."""
    out = None
    for slot, expert in enumerate(expert_index[0].tolist()):
        if keep is not None and not bool(keep[0, slot]):
            continue
        y = experts[expert](hidden) * combine_weight[0, slot].to(hidden.dtype)
        out = y if out is None else out + y
    return torch.zeros_like(hidden) if out is None else out
