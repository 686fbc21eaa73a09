"""sdpa for packed rows: each sample's attention computed on its own.

A packed micro-batch (``data.preprocess.collate_packed``) is one row of samples whose position
ids restart at 0. transformers' sdpa attends inside each sample through a block-diagonal mask
over the whole row, so its cost grows with the square of the row (every off-diagonal block is
computed and thrown away) while padded micro-batches pay only for their longest sample: on a
micro-batch of 4 to 16 samples, packing under plain sdpa would cost more than the padding it
saves. Flash attention has varlen kernels for this; for sdpa this function runs transformers' own
``sdpa_attention_forward`` once per sample, on the sample's block of the mask (so sliding
windows and every family's mask rules still hold). Rows that are not packed go through plain
sdpa unchanged.
"""

from __future__ import annotations

import torch

PACKED_SDPA = "moetool_packed_sdpa"
_last: tuple[torch.Tensor, list[tuple[int, int]] | None] | None = None


def packed_segments(position_ids: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """(start, end) of each sample of a packed row ``(1, N)``; None unless there are several.
    The decoder layers of one forward share one ``position_ids`` tensor: it is read once."""
    global _last
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    if _last is not None and _last[0] is position_ids:
        return _last[1]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    segments = None
    if len(starts) > 1 and starts[0] == 0:
        ends = [*starts[1:], position_ids.shape[1]]
        segments = list(zip(starts, ends, strict=True))
    _last = (position_ids, segments)
    return segments


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; query/key/value ``(1, heads, N, dim)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = packed_segments(kwargs.get("position_ids"))
    if segments is None or query.shape[2] != key.shape[2]:  # not packed, or decoding
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for start, end in segments:
        block = None if attention_mask is None else attention_mask[..., start:end, start:end]
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            block,
            **kwargs,
        )
        outputs.append(out)  # (1, tokens, heads, dim)
    return torch.cat(outputs, dim=1), None


def register() -> None:
    """Make ``PACKED_SDPA`` an attention implementation transformers models can be set to
    (its masks are sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(model) -> bool:
    """Run the language model of ``model`` (a LLaVA, dense or sparse) on per-sample sdpa when it
    runs on sdpa (the vision tower keeps its implementation); for training on packed
    micro-batches. Other implementations are left alone: flash attention packs with its varlen
    kernels, flex_attention skips the masked blocks, eager (some families' only choice, e.g.
    gemma2 with its logit soft-capping) computes the whole row. Returns whether it changed."""
    if model.config.get_text_config()._attn_implementation != "sdpa":
        return False
    register()
    model.set_attn_implementation({"text_config": PACKED_SDPA})
    return True
