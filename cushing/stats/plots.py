"""Figures people would rather look at than read. Each function writes one PNG to the path it is given."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cushing.stats.metrics import auc, confusion, roc_points

__all__ = ["roc_plot", "confusion_plot", "curves_plot", "calibration_plot", "decision_plot", "pyplot"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path, *, left: float = 0.7, bottom: float = 0.55, top: float = 0.4,
          wspace: float = 0.25) -> None:
    """Write and close `fig` with fixed margins in inches: `tight_layout` would draw the figure once more to
    measure it, 40% of a plot's cost."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, bottom=bottom / h, right=1 - 0.2 / w, top=1 - top / h, wspace=wspace)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def roc_plot(pred: pd.DataFrame, path: str | Path, title: str = "") -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4.6))
    for ax, split in zip(axes, ("val", "test")):
        part = pred[pred["split"] == split]
        for label, sub, style in (("all", part, "-"), ("female", part[part["sex"] == "F"], "--"),
                                  ("male", part[part["sex"] == "M"], ":")):
            y, p = sub["label"].to_numpy(), sub["probability"].to_numpy()
            if y.sum() == 0 or y.sum() == len(y):
                continue
            fpr, tpr = roc_points(y, p)
            ax.plot(fpr, tpr, style, drawstyle="steps-post",
                    label=f"{label} AUC {float(auc(y, p)[0]):.3f} (n={len(y)}, pos={int(y.sum())})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, label="chance")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{split} ROC", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path, top=0.75 if title else 0.4)


def confusion_plot(pred: pd.DataFrame, threshold: float, path: str | Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.8))
    for ax, split in zip(axes, ("val", "test")):
        part = pred[pred["split"] == split]
        c = confusion(part["label"].to_numpy(), part["probability"].to_numpy(), threshold)
        m = np.rint([[c.tn[0, 0], c.fp[0, 0]], [c.fn[0, 0], c.tp[0, 0]]]).astype(int)  # rows: true, cols: predicted
        ax.imshow(m, cmap="Blues")
        for a, b in np.ndindex(2, 2):
            ax.text(b, a, str(m[a, b]), ha="center", va="center", fontsize=14,
                    color="white" if m[a, b] > m.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["control", "patient"], yticklabels=["control", "patient"],
               xlabel="predicted", ylabel="true", title=f"{split} (threshold {threshold:.3f})")
    _save(fig, path, left=1.0, wspace=0.5)


def curves_plot(history: list[dict[str, float]], best_epoch: int, path: str | Path) -> None:
    h = pd.DataFrame(history)
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    a1.plot(h["epoch"], h["train/loss"], label="train")
    a1.plot(h["epoch"], h["val/loss"], label="val")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.plot(h["epoch"], h["val/f1"], label="val F1", color="C2")
    if "val/auc" in h:
        a2.plot(h["epoch"], h["val/auc"], label="val AUC", color="C3", alpha=0.7)
    a2.set(xlabel="epoch", ylim=(0, 1.02), title="validation")
    for ax in (a1, a2):
        ax.axvline(best_epoch, color="0.5", ls="--", lw=0.8, label=f"best epoch {best_epoch}")
        ax.legend(fontsize=8)
    _save(fig, path)


def calibration_plot(reliability: dict[str, pd.DataFrame], path: str | Path) -> None:
    fig, ax = pyplot().subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, label="perfect")
    for split, r in reliability.items():
        r = r[r["count"] > 0]
        ax.plot(r["mean_predicted"], r["observed_rate"], "o-", label=f"{split} (n={int(r['count'].sum())})")
    ax.set(xlabel="mean predicted probability", ylabel="observed patient rate", xlim=(0, 1), ylim=(0, 1),
           title="reliability")
    ax.legend(fontsize=8)
    _save(fig, path)


def decision_plot(curves: dict[str, pd.DataFrame], operating: dict[str, tuple[float, float]],
                  path: str | Path | None = None, title: str = "decision curve"):
    """Decision curves over one another: net benefit, its 95% band and a dot at (operating threshold, net benefit)
    per label; treat all (the first's) and treat none. Written to `path`, or the figure returned."""
    fig, ax = pyplot().subplots(figsize=(6, 4.4))
    first = next(iter(curves.values()))
    ax.plot(first["threshold"], first["treat_all"], "--", color="0.4", label="treat all")
    ax.axhline(0, color="0.6", lw=0.8, label="treat none")
    for i, (label, d) in enumerate(curves.items()):
        ax.plot(d["threshold"], d["net_benefit"], color=f"C{i}", label=label)
        ax.fill_between(d["threshold"], d["ci_low"], d["ci_high"], color=f"C{i}", alpha=0.15, lw=0)
        t, nb = operating.get(label, (np.inf, np.nan))
        if t <= d["threshold"].max():
            ax.plot([t], [nb], "o", color=f"C{i}", ms=5)
    top = np.nanmax(np.concatenate([d[c].to_numpy(float) for d in curves.values() for c in ("ci_high", "treat_all")]
                                   + [[0.01]]))
    ax.set(xlabel="threshold probability", ylabel="net benefit", ylim=(-0.1 * top, 1.1 * top), title=title)
    ax.legend(fontsize=7)
    if path is None:
        fig.tight_layout()
        return fig
    _save(fig, path)
