"""Router losses: Switch load balancing (Eq. 9-11) and the router z-loss."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs: torch.Tensor, expert_index: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 9-11: ``E * sum_i f_i * P_i``, with f_i the fraction of tokens whose top-1 expert is
    i and P_i the mean routing probability of expert i. Equals 1.0 for perfectly balanced
    routing. ``token_mask`` (T,) leaves padding out."""
    num_experts = probs.shape[-1]
    top1 = expert_index[:, 0]
    if token_mask is not None:
        probs = probs[token_mask]
        top1 = top1[token_mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    fraction = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / top1.shape[0]
    mean_prob = probs.mean(0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits."""
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()
