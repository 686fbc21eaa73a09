"""The MoE block (paper Eq. 5-11): its config, router, top-k routing with optional capacity,
dispatch to experts, and the router losses the model computes from the recorded logits.

Names are imported on first use, so that ``MoEConfig`` (read by recipes and the streaming
upcycle) does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "MoEBlock": "block",
    "MoERouter": "block",
    "MoEConfig": "config",
    "MoEConfigError": "config",
    "dispatch_combine": "dispatch",
    "load_balancing_loss": "losses",
    "router_losses": "losses",
    "router_z_loss": "losses",
    "recording_router_logits": "recording",
    "Routing": "routing",
    "batch_priority_keep": "routing",
    "expert_capacity": "routing",
    "route": "routing",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
