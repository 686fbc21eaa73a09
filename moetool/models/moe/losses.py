"""Router losses, computed by the model from the recorded router logits: Switch load balancing
(Eq. 9-11), per micro-batch or over the global batch, and the router z-loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expert_fractions(
    top1: torch.Tensor, num_experts: int, global_batch: bool = False
) -> torch.Tensor:
    """f_i of Eq. 10: the fraction of tokens whose top-1 expert is i. With ``global_batch``,
    counted over every data-parallel rank (the counts are all-reduced; Qiu et al. 2025)."""
    counts = torch.bincount(top1, minlength=num_experts).float()
    if global_batch and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    total = counts.sum()
    return counts / total if total > 0 else counts


def load_balancing_loss(
    probs: torch.Tensor,
    expert_index: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    global_batch: bool = False,
) -> torch.Tensor:
    """Eq. 9-11: ``E * sum_i f_i * P_i``, with f_i the fraction of tokens whose top-1 expert is
    i and P_i the mean routing probability of expert i. Equals 1.0 for perfectly balanced
    routing. ``token_mask`` (T,) leaves padding out."""
    num_experts = probs.shape[-1]
    top1 = expert_index[:, 0]
    if token_mask is not None:
        probs = probs[token_mask]
        top1 = top1[token_mask]
    fraction = expert_fractions(top1, num_experts, global_batch)
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return num_experts * torch.sum(fraction.to(probs.dtype) * probs.mean(0))


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits."""
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_losses(
    router_logits: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None = None,
    global_batch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z): Eq. 9-11 and the z-loss of every MoE layer's logits (T, E), summed over
    layers. ``token_mask`` (T,) marks the tokens that count (padding excluded)."""
    aux = z = None
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top1 = probs.argmax(-1, keepdim=True)
        layer_aux = load_balancing_loss(probs, top1, token_mask, global_batch)
        layer_z = router_z_loss(logits, token_mask)
        aux = layer_aux if aux is None else aux + layer_aux
        z = layer_z if z is None else z + layer_z
    return aux, z
