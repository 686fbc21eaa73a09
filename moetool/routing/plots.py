"""The paper's routing figures (matplotlib, PNG and SVG), with real decoder-layer indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetool.routing.capture import RoutingCapture
from moetool.routing.stats import expert_load, modality_share, top_pathways


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return paths


def plot_expert_load(capture: RoutingCapture, out: Path) -> list[Path]:
    """Figure 4 (left): each expert's share of top-1 tokens per MoE layer, with the balanced
    share 1/E dashed."""
    plt = _figure()
    load = expert_load(capture).fillna(0.0)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(load) + 2), 3.2))
    x = np.arange(len(load))
    for expert in load.columns:
        ax.plot(x, load[expert].to_numpy(), marker="o", label=f"expert {expert + 1}")
    ax.axhline(1 / capture.num_experts, linestyle="--", color="gray", label="balanced")
    ax.set_xticks(x, [str(i) for i in load.index])
    ax.set_xlabel("MoE layer (decoder layer index)")
    ax.set_ylabel("share of tokens (top-1)")
    ax.legend(fontsize="small", ncol=2)
    paths = _save(fig, out, "expert_load")
    plt.close(fig)
    return paths


def plot_modality(capture: RoutingCapture, out: Path) -> list[Path]:
    """Figures 4 (right) and 5: for every expert, the share of its tokens that are text and
    image, per MoE layer; dashed: the text share of all routed tokens (no preference)."""
    plt = _figure()
    share = modality_share(capture).fillna(0.0)
    experts = capture.num_experts
    cols = min(4, experts)
    rows = -(-experts // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    x = np.arange(len(capture.layers))
    overall_text = float((capture.records["modality"] == "text").mean())
    for expert in range(experts):
        ax = axes[expert // cols][expert % cols]
        part = share.xs(expert, level="expert").reindex(capture.layers).fillna(0.0)
        ax.bar(x, part["text"], label="text", color="#4c72b0")
        ax.bar(x, part["image"], bottom=part["text"], label="image", color="#dd8452")
        ax.axhline(overall_text, linestyle="--", color="gray")
        ax.set_title(f"expert {expert + 1}")
        ax.set_xticks(x, [str(i) for i in capture.layers], fontsize="x-small")
        ax.set_ylim(0, 1)
    for extra in range(experts, rows * cols):
        axes[extra // cols][extra % cols].axis("off")
    axes[0][0].legend(fontsize="small")
    fig.supxlabel("MoE layer (decoder layer index)")
    paths = _save(fig, out, "modality")
    plt.close(fig)
    return paths


def plot_pathways(capture: RoutingCapture, out: Path, n: int = 10) -> list[Path]:
    """Figure 6: every token's top-1 pathway (one-hot over layers x experts) projected by PCA,
    with the ``n`` most frequent text and image pathways marked."""
    plt = _figure()
    df = capture.records[capture.records["rank"] == 0]
    table = (
        df.pivot_table(
            index=["sample", "position"], columns="layer", values="expert", aggfunc="first"
        )
        .dropna()
        .astype(int)[capture.layers]
    )
    onehot = np.zeros((len(table), len(capture.layers) * capture.num_experts))
    for j, _ in enumerate(capture.layers):
        onehot[np.arange(len(table)), j * capture.num_experts + table.iloc[:, j].to_numpy()] = 1
    centred = onehot - onehot.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
    coords = centred @ basis
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(coords[:, 0], coords[:, 1], s=4, color="lightgray", label="all tokens")
    mean = onehot.mean(axis=0)
    for modality, colour in (("text", "#4c72b0"), ("image", "#dd8452")):
        for k, row in top_pathways(capture, modality, n).iterrows():
            vec = np.zeros_like(mean)
            for j, expert in enumerate(row["pathway"]):
                vec[j * capture.num_experts + expert] = 1
            point = (vec - mean) @ basis
            ax.scatter(
                point[0],
                point[1],
                s=30 + 300 * row["share"],
                color=colour,
                alpha=0.7,
                label=f"top-{n} {modality}" if k == 0 else None,
            )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize="small")
    paths = _save(fig, out, "pathways")
    plt.close(fig)
    return paths


def plot_all(capture: RoutingCapture, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return (
        plot_expert_load(capture, out) + plot_modality(capture, out) + plot_pathways(capture, out)
    )
