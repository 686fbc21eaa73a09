"""Options that several commands share, spelled and explained once."""

from __future__ import annotations

from typing import Annotated

import typer

from moetool.models.attention import ATTN_IMPLEMENTATIONS

AttnOpt = Annotated[
    str | None,
    typer.Option(
        "--attn-implementation",
        help=f"Attention of the vision tower and the LM: {' | '.join(ATTN_IMPLEMENTATIONS)} "
        "(default: the one the checkpoint was trained with).",
    ),
]
