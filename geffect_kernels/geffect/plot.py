"""The paper's figures as PNG: G-effect per group × step (one heatmap per risk) and cumulative curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic_files import atomic_write


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (shared with `eval.report`)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


HEATMAP_COLOURS = "RdBu"  # negative values red, positive blue: the title says so
HEATMAP_TITLE = "{objective}G-effect on the {risk} risk\n(red < 0: that NLL rises)"


def _save(fig, path):
    """A PNG written atomically: a link planted at ``path`` is replaced, never written through."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_heatmap(history, risk: str, path) -> Path:
    """Groups (rows, model order) × recorded steps (columns); diverging colours centred on 0."""
    plt = pyplot()
    groups = history.groups
    values = np.array([history.per_step(risk, g) for g in groups])
    limit = float(np.abs(values).max()) or 1.0
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * len(history.steps)), min(12, 1.5 + 0.3 * len(groups))))
    image = ax.imshow(values, aspect="auto", cmap=HEATMAP_COLOURS, vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ticks = np.linspace(0, len(history.steps) - 1, min(len(history.steps), 10)).round().astype(int)
    ax.set_xticks(ticks, [history.steps[i] for i in ticks])
    ax.set_xlabel("step")
    name = f"{history.objective} " if history.objective else ""
    ax.set_title(HEATMAP_TITLE.format(objective=name, risk=risk), fontsize=10)
    fig.colorbar(image, ax=ax, label="G-effect")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def symlog_threshold(curves) -> float | None:
    """Where a symmetric-log axis turns linear: a power of ten a tenth below the smallest curve's largest
    magnitude, so that the smallest curve still spans a decade of the log part. None: every curve is 0."""
    sizes = [float(np.max(np.abs(c))) for c in curves if len(c)]
    sizes = [s for s in sizes if s > 0]
    if not sizes:
        return None
    return float(10.0 ** np.floor(np.log10(min(sizes) / 10)))


def plot_cumulative(histories: dict, path, risks=None) -> Path:
    """Cumulative total G-effect over steps, one line per objective (``{label: history}``), one panel per risk.

    Objectives' G-effects differ by orders of magnitude (GA's and NPO's dwarf the token-weighted ones'), so the
    y axis is symmetric-log: logarithmic in magnitude on both sides of 0, linear within the threshold it names."""
    plt = pyplot()
    risks = risks or list(dict.fromkeys(r for h in histories.values() for r in h.risks))
    fig, axes = plt.subplots(1, len(risks), figsize=(5 * len(risks), 3.8), squeeze=False)
    for ax, risk in zip(axes[0], risks):
        curves = {label: h.cumulative(risk) for label, h in histories.items() if risk in h.risks}
        for label, curve in curves.items():
            ax.plot(histories[label].steps, curve, marker=".", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        threshold = symlog_threshold(curves.values())
        if threshold is not None:
            ax.set_yscale("symlog", linthresh=threshold)
            ax.axhspan(-threshold, threshold, color="grey", alpha=0.1, lw=0, label=f"linear within ±{threshold:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative G-effect" + (" (symlog)" if threshold is not None else ""))
        ax.set_title(f"{risk} risk")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_history(history, out_dir, *, prefix=None) -> list[Path]:
    """One heatmap per risk and the cumulative curves of ``history`` into ``out_dir``; the PNG paths."""
    if not len(history):
        raise ValueError("the history is empty: record results before plotting")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = prefix or history.objective or "geffect"
    paths = [plot_heatmap(history, risk, out_dir / f"{stem}_heatmap_{risk}.png") for risk in history.risks]
    paths.append(plot_cumulative({history.objective or "objective": history}, out_dir / f"{stem}_cumulative.png"))
    return paths
