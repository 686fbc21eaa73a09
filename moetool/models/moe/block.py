"""The MoE block that replaces a decoder layer's ``mlp``: router -> top-k -> experts -> output."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moetool.models.moe.config import MoEConfig
from moetool.models.moe.dispatch import dispatch_combine
from moetool.models.moe.recording import record_router_logits
from moetool.models.moe.routing import Routing, expert_capacity, route


class MoERouter(nn.Linear):
    """``Linear(hidden, E, bias=False)`` computed in fp32 (Eq. 5). Its logits are recorded for
    the model, which computes the router losses from them."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.float(), self.weight.float())
        record_router_logits(logits)
        return logits


class MoEBlock(nn.Module):
    """E experts (each a module of the backbone's own MLP class) and a router.

    Each token goes to its top-k experts (Eq. 6); the combine weights are the renormalised top-k
    probabilities or, for top-1 and on request, the raw ones. Stateless: ``forward`` reads
    nothing but its input and parameters and writes nothing; its router's logits are recorded
    (see ``moetool.models.moe.recording``) and the model computes the aux and z losses.
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, config: MoEConfig):
        super().__init__()
        if len(experts) != config.num_experts:
            raise ValueError(f"got {len(experts)} experts for num_experts={config.num_experts}")
        self.moe_config = config.check()
        self.router = MoERouter(hidden_size, config.num_experts)
        self.experts = nn.ModuleList(experts)

    @classmethod
    def upcycle(cls, mlp: nn.Module, hidden_size: int, config: MoEConfig) -> MoEBlock:
        """Experts as exact copies of ``mlp`` (the first is ``mlp`` itself)."""
        experts = [mlp] + [copy.deepcopy(mlp) for _ in range(config.num_experts - 1)]
        return cls(experts, hidden_size, config)

    def capacity(self, num_tokens: int) -> int | None:
        c = self.moe_config
        factor = c.capacity_factor if self.training else c.eval_capacity_factor
        if factor <= 0:
            return None
        return expert_capacity(num_tokens, c.num_experts, c.top_k, factor, c.min_capacity)

    def routing(self, logits: torch.Tensor) -> Routing:
        """The routing decisions for router logits (T, E), as ``forward`` takes them."""
        c = self.moe_config
        return route(logits, c.top_k, c.renormalize, self.capacity(logits.shape[0]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        routing = self.routing(self.router(hidden))
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

    def extra_repr(self) -> str:
        c = self.moe_config
        return (
            f"num_experts={c.num_experts}, top_k={c.top_k}, capacity_factor="
            f"{c.capacity_factor}, eval_capacity_factor={c.eval_capacity_factor}, "
            f"normalize_top_k={c.renormalize}"
        )
