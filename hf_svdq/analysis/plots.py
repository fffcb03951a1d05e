"""Pictures of an analysis (matplotlib, the ``plots`` extra): a sensitivity heatmap (blocks x module
types) and the policy's ranks / kept-dense layers on the same grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analyze import Analysis


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("hf_svdq plots need matplotlib: pip install 'hf-svdq[plots]'") from None
    return plt


def _grid(analysis: Analysis) -> tuple[list[int | None], list[str], dict[tuple[int | None, str], str]]:
    blocks = sorted({r.block for r in analysis.rows}, key=lambda b: -1 if b is None else b)
    kinds = list(dict.fromkeys(r.kind for r in analysis.rows))
    return blocks, kinds, {(r.block, r.kind): r.name for r in analysis.rows}


def _finish(plt: Any, fig: Any, ax: Any, image: Any, blocks: list[int | None], kinds: list[str], title: str,
            label: str, path: str | Path) -> Path:
    """Axis ticks (module types x blocks), title, colorbar; saved as PNG."""
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), ["-" if b is None else str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sensitivity_heatmap(analysis: Analysis, path: str | Path) -> Path:
    """log10 KL(dense || model) with the cell's layer compressed alone; P = pillar, s = sensitive."""
    plt = _pyplot()
    blocks, kinds, cell = _grid(analysis)
    group_of = {n: g for g, members in analysis.groups.items() for n in members}
    values = [[math.nan] * len(kinds) for _ in blocks]
    marks: list[tuple[int, int, str]] = []
    for i, b in enumerate(blocks):
        for j, k in enumerate(kinds):
            group = group_of.get(cell.get((b, k), ""))
            if group is None:
                continue
            values[i][j] = math.log10(max(analysis.probes["alone"][group]["kl"], 1e-8))
            cls = analysis.classes[group][0]
            if cls != "robust":
                marks.append((i, j, "P" if cls == "pillar" else "s"))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.28 * len(blocks)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r")
    for i, j, text in marks:
        ax.text(j, i, text, ha="center", va="center", color="cyan", fontsize=8, fontweight="bold")
    title = f"compressed alone: log10 KL vs dense ({analysis.info.get('grouping', 'layer')} groups)"
    return _finish(plt, fig, ax, image, blocks, kinds, title, "log10 KL (nats/token)", path)


def plot_policy_ranks(analysis: Analysis, path: str | Path) -> Path:
    """The policy's rank of each layer as a share of min(out, in); D = kept dense."""
    plt = _pyplot()
    blocks, kinds, cell = _grid(analysis)
    if analysis.policy is None:
        raise ValueError("the analysis has no policy to plot")
    ranks, dense = analysis.policy["ranks"], analysis.policy["dense"]
    shape = {r.name: min(r.out_features, r.in_features) for r in analysis.rows}
    values = [[math.nan] * len(kinds) for _ in blocks]
    marks: list[tuple[int, int, str]] = []
    for i, b in enumerate(blocks):
        for j, k in enumerate(kinds):
            name = cell.get((b, k))
            if name is None:
                continue
            if name in ranks:
                values[i][j] = ranks[name] / shape[name]
                marks.append((i, j, str(ranks[name])))
            elif name in dense:
                values[i][j] = 1.0
                marks.append((i, j, "D"))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.28 * len(blocks)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, j, text in marks:
        ax.text(j, i, text, ha="center", va="center", color="white" if text != "D" else "black", fontsize=6)
    predicted = analysis.policy["predicted"]
    title = f"policy: rank / min(out, in), D = dense; {predicted['bits_per_weight']:.2f} bits/weight"
    return _finish(plt, fig, ax, image, blocks, kinds, title, "rank share", path)
