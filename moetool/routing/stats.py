"""Statistics of routing captures (pandas): expert load, modality preference, balance and
the most frequent top-1 expert pathways."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moetool.routing.capture import RoutingCapture


def expert_load(capture: RoutingCapture, top1: bool = True) -> pd.DataFrame:
    """Share of routed tokens per expert in each MoE layer (rows: layers, columns: experts);
    each row sums to 1. ``top1`` counts only first choices, else every top-k assignment."""
    df = capture.records
    if top1:
        df = df[df["rank"] == 0]
    counts = df.groupby(["layer", "expert"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=range(capture.num_experts), fill_value=0)
    counts = counts.reindex(index=capture.layers, fill_value=0)
    return counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)


def modality_share(capture: RoutingCapture, top1: bool = False) -> pd.DataFrame:
    """For each (layer, expert): the share of its tokens that are text and image (Figure 4 right
    and Figure 5); index (layer, expert), columns text and image, rows sum to 1."""
    df = capture.records
    if top1:
        df = df[df["rank"] == 0]
    counts = (
        df.groupby(["layer", "expert", "modality"], observed=False).size().unstack(fill_value=0)
    )
    full = pd.MultiIndex.from_product(
        [capture.layers, range(capture.num_experts)], names=["layer", "expert"]
    )
    counts = counts.reindex(full, fill_value=0).reindex(columns=["text", "image"], fill_value=0)
    return counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)


def balance(capture: RoutingCapture) -> pd.DataFrame:
    """Per layer: coefficient of variation of the top-1 load (0 = balanced) and the normalised
    entropy of the load (1 = balanced)."""
    load = expert_load(capture, top1=True).fillna(0.0)
    cv = load.std(axis=1, ddof=0) / load.mean(axis=1)
    p = load.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return pd.DataFrame(
        {"cv": cv, "entropy": entropy / np.log(capture.num_experts)}, index=load.index
    )


def top_pathways(capture: RoutingCapture, modality: str | None = None, n: int = 10) -> pd.DataFrame:
    """The ``n`` most frequent top-1 expert sequences across MoE layers (a token's pathway,
    Figure 6), with their share of tokens; ``modality`` restricts to text or image tokens."""
    df = capture.records[capture.records["rank"] == 0]
    if modality is not None:
        df = df[df["modality"] == modality]
    paths = df.pivot_table(
        index=["sample", "position"], columns="layer", values="expert", aggfunc="first"
    ).dropna()
    tuples = paths[capture.layers].astype(int).apply(tuple, axis=1)
    counts = tuples.value_counts()
    out = pd.DataFrame({"pathway": counts.index[:n], "tokens": counts.to_numpy()[:n]})
    out["share"] = out["tokens"] / max(1, len(tuples))
    return out


def summary(capture: RoutingCapture) -> dict:
    """``moetool routing stats --json``: top-1 load per layer, balance, image share per
    (layer, expert) and the top pathways of each modality, as plain JSON values."""
    load, bal = expert_load(capture), balance(capture)
    share = modality_share(capture)
    paths = {m: top_pathways(capture, m) for m in ("text", "image")}
    return {
        "num_experts": capture.num_experts,
        "top_k": capture.top_k,
        "layers": capture.layers,
        "load_top1": {str(k): v for k, v in load.fillna(0).T.to_dict("list").items()},
        "balance": {str(k): v for k, v in bal.T.to_dict().items()},
        "image_share": {
            f"{layer}/{expert}": v for (layer, expert), v in share["image"].fillna(0).items()
        },
        "top_pathways": {
            m: [{"pathway": list(map(int, r.pathway)), "share": r.share} for r in p.itertuples()]
            for m, p in paths.items()
        },
    }
