"""The MoE block that replaces a decoder layer's ``mlp``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetool.models.moe.dispatch import dispatch_combine
from moetool.models.moe.losses import load_balancing_loss, router_z_loss
from moetool.models.moe.routing import Routing, expert_capacity, route


@dataclass(frozen=True)
class MoEOptions:
    num_experts: int
    top_k: int
    capacity_factor: float = 0.0  # training; 0 = dropless
    eval_capacity_factor: float = 0.0  # evaluation; 0 = dropless
    min_capacity: int = 0
    normalize_top_k: bool = True


@dataclass
class RoutingRecord:
    """One forward's routing decisions in one MoE layer, for analysis (detached, on CPU)."""

    expert_index: torch.Tensor  # (T, k)
    combine_weight: torch.Tensor  # (T, k)
    probs: torch.Tensor  # (T, E)
    keep: torch.Tensor | None
    token_mask: torch.Tensor | None  # (T,) valid (non-padding) tokens
    image_mask: torch.Tensor | None  # (T,) image tokens


class MoEBlock(nn.Module):
    """E experts (each a module of the backbone's own MLP class) and a linear router.

    The router is ``Linear(hidden, E, bias=False)`` computed in fp32 (Eq. 5); each token goes to
    its top-k experts (Eq. 6). After each forward, ``aux_loss`` holds the layer's Switch
    load-balancing loss (Eq. 9-11) and ``z_loss`` the router z-loss (None when ``compute_losses``
    is off, as the model sets it for decoding); with ``record_routing`` set,
    ``last_routing`` holds a ``RoutingRecord``. The model sets ``token_mask`` and ``image_mask``
    (batch x sequence) before each forward and leaves them until the next one, so that a
    gradient-checkpointing recomputation sees the same masks.
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, options: MoEOptions):
        super().__init__()
        if len(experts) != options.num_experts:
            raise ValueError(f"got {len(experts)} experts for num_experts={options.num_experts}")
        self.options = options
        self.router = nn.Linear(hidden_size, options.num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.compute_losses = True  # the model turns it off for decoding
        self.record_routing = False
        self.last_routing: RoutingRecord | None = None
        self.token_mask: torch.Tensor | None = None
        self.image_mask: torch.Tensor | None = None

    @classmethod
    def upcycle(cls, mlp: nn.Module, hidden_size: int, options: MoEOptions) -> MoEBlock:
        """Experts as exact copies of ``mlp`` (the first is ``mlp`` itself)."""
        experts = [mlp] + [copy.deepcopy(mlp) for _ in range(options.num_experts - 1)]
        return cls(experts, hidden_size, options)

    def capacity(self, num_tokens: int) -> int | None:
        factor = (
            self.options.capacity_factor if self.training else self.options.eval_capacity_factor
        )
        if factor <= 0:
            return None
        return expert_capacity(
            num_tokens,
            self.options.num_experts,
            self.options.top_k,
            factor,
            self.options.min_capacity,
        )

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = F.linear(hidden.float(), self.router.weight.float())  # fp32 router
        routing = route(
            logits, self.options.top_k, self.options.normalize_top_k, self.capacity(hidden.shape[0])
        )
        return logits, routing

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        logits, routing = self.route(hidden)
        mask = self._mask(self.token_mask, hidden.shape[0])
        if self.compute_losses:
            self.aux_loss = load_balancing_loss(routing.probs, routing.expert_index, mask)
            self.z_loss = router_z_loss(logits, mask)
        else:
            self.aux_loss = self.z_loss = None
        if self.record_routing:
            self.last_routing = RoutingRecord(
                routing.expert_index.detach().cpu(),
                routing.combine_weight.detach().cpu(),
                routing.probs.detach().cpu(),
                None if routing.keep is None else routing.keep.detach().cpu(),
                None if mask is None else mask.detach().cpu(),
                self._mask(self.image_mask, hidden.shape[0]),
            )
        out = dispatch_combine(
            hidden,
            routing.expert_index,
            routing.combine_weight,
            self.experts,
            routing.keep,
            skip_empty=self._may_skip_empty_experts(),
        )
        return out.reshape(shape)

    def _may_skip_empty_experts(self) -> bool:
        """Without autograd, experts that got no tokens need not run -- unless DeepSpeed ZeRO-3
        partitions the parameters: every rank must then call every expert, whose forward
        gathers its parameters collectively."""
        if torch.is_grad_enabled():
            return False
        return not any(hasattr(p, "ds_id") for p in self.experts[0].parameters())

    @staticmethod
    def _mask(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        # A mask set for another shape (e.g. a stale one) is ignored rather than misapplied.
        if mask is None or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).to(torch.bool)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"num_experts={o.num_experts}, top_k={o.top_k}, capacity_factor="
            f"{o.capacity_factor}, eval_capacity_factor={o.eval_capacity_factor}, "
            f"normalize_top_k={o.normalize_top_k}"
        )
