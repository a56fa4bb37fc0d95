"""PNG plots for the analysis commands (matplotlib, headless).

Figures are made without pyplot, so no backend is chosen here: a notebook that imports the commands keeps its own
(inline) backend, and saving a PNG needs no display."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def overlap_heatmap(matrix: np.ndarray, path: Path, title: str, pattern: str | None = None) -> None:
    """The layer x layer overlap; with a pattern, each F layer's group (it and its S layers) is boxed
    and the axis labels carry F/S."""
    n = len(matrix)
    fig = Figure(figsize=(6 + n / 8, 5 + n / 8))
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, label="|T_i ∩ T_j| / k")
    labels = [f"{i}{pattern[i] if pattern else ''}" for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if pattern:
        starts = [i for i, c in enumerate(pattern) if c == "F"] + [n]
        for a, b in zip(starts, starts[1:]):
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, edgecolor="red", linewidth=1.5))
        title += f"\npattern {pattern}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curves(series: dict[str, tuple[list, list]], path: Path, title: str, xlabel: str, ylabel: str,
           hline: float | None = None, logy: bool = False) -> None:
    """One line per named (x, y) series; an optional dashed reference level; optionally a log y axis."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label="all F")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def roofline(points: list[dict], matmul_tflops: float, copy_tbs: float, gather_tbs: list[float], path: Path,
             title: str) -> None:
    """Log-log roofline: points (group, tk, intensity in FLOP/byte, tflops) under min(matmul, bandwidth x
    intensity) for the copy bandwidth (solid) and each gather rate (dashed); marker size grows with Tk."""
    fig = Figure(figsize=(10.5, 5.5))
    ax = fig.subplots()
    x = np.logspace(0.5, 4, 300)
    ax.plot(x, np.minimum(matmul_tflops, copy_tbs * x), color="black", linewidth=1.3,
            label=f"copy {copy_tbs:.2f} TB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    for g in dict.fromkeys(gather_tbs):
        ax.plot(x, np.minimum(matmul_tflops, g * x), color="gray", linestyle="--", linewidth=1,
                label=f"gathering sparse MLA rows: {g:.2f} TB/s")
    tks = sorted({p["tk"] for p in points})
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["group"], []).append(p)
    for (name, pts), marker in zip(groups.items(), "osD^v<>ph*"):
        ax.scatter([p["intensity"] for p in pts], [p["tflops"] for p in pts], marker=marker, alpha=0.8,
                   s=[18 + 60 * tks.index(p["tk"]) / max(1, len(tks) - 1) for p in pts], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(0.3, 2 * matmul_tflops)
    ax.set_xlabel("FLOP per byte moved")
    ax.set_ylabel("TFLOP/s achieved")
    ax.set_title(f"{title}\nmarker size: Tk from {tks[0]:,} to {tks[-1]:,}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
