"""The MoE block (paper Eq. 5-11): router, top-k routing with optional capacity, dispatch to
experts, and the auxiliary losses."""

from moetool.models.moe.block import MoEBlock, MoEOptions
from moetool.models.moe.dispatch import dispatch_combine
from moetool.models.moe.losses import load_balancing_loss, router_z_loss
from moetool.models.moe.routing import Routing, batch_priority_keep, expert_capacity, route

__all__ = [
    "MoEBlock",
    "MoEOptions",
    "Routing",
    "batch_priority_keep",
    "dispatch_combine",
    "expert_capacity",
    "load_balancing_loss",
    "route",
    "router_z_loss",
]
