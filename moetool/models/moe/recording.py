"""Router logits of one forward, recorded the way transformers' ``OutputRecorder`` records them:
the router reports its logits to the recording opened by the model's forward (if any), so the
block keeps no state between calls.

Gradient checkpointing re-runs a decoder layer during backward; with reentrant checkpointing the
first run is under ``no_grad``, so logits recorded inside it carry no gradient.
``checkpoint_with_router_logits`` wraps a layer's checkpoint function so that the logits leave
the checkpointed region as its outputs, which checkpointing of every kind connects to autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_RECORDING: ContextVar[list[torch.Tensor] | None] = ContextVar(
    "moetool_router_logits", default=None
)


@contextmanager
def recording_router_logits() -> Iterator[list[torch.Tensor]]:
    """Collect, in call order, the logits of every router that runs inside the block."""
    records: list[torch.Tensor] = []
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def record_router_logits(logits: torch.Tensor) -> None:
    records = _RECORDING.get()
    if records is not None:
        records.append(logits)


def checkpoint_with_router_logits(checkpoint: Callable) -> Callable:
    """``checkpoint(function, *args, **kwargs)`` that also hands the router logits produced
    inside ``function`` to the recording outside it, as outputs of the checkpointed region."""
    if getattr(checkpoint, "moetool_router_logits", False):
        return checkpoint

    def wrapped(function, *args, **kwargs):
        if _RECORDING.get() is None:  # nobody records (e.g. losses off): plain checkpointing
            return checkpoint(function, *args, **kwargs)
        layout: list = []  # (output is a tuple, its length), set by the first run

        def run(*inner_args):
            with recording_router_logits() as logits:
                out = function(*inner_args)
            single = not isinstance(out, tuple)
            outs = (out,) if single else tuple(out)
            if not layout:
                layout.append((single, len(outs)))
            return (*outs, *logits)

        result = checkpoint(run, *args, **kwargs)
        single, count = layout[0]
        for logits in result[count:]:
            record_router_logits(logits)
        return result[0] if single else tuple(result[:count])

    wrapped.moetool_router_logits = True
    return wrapped
