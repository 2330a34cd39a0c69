"""Reports of a discovery evaluation: metrics tables (Markdown / CSV) and plots (PNG).

Plots: predicted vs DFT formation energy (parity), histogram of the hull-distance error, and cumulative
precision and DAF along the list ranked by predicted hull distance (most stable first).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import pandas as pd

from .metrics import STABILITY_THRESHOLD

__all__ = ["metrics_table", "write_metrics_tables", "cumulative_precision_daf", "plot_parity",
           "plot_hull_error_histogram", "plot_cumulative", "write_report"]

_TABLE_KEYS = ("F1", "DAF", "Precision", "Recall", "Accuracy", "TPR", "FPR", "TNR", "FNR", "MAE", "RMSE", "R2",
               "TP", "FP", "TN", "FN", "n", "missing_preds", "masked_outliers")
_COUNT_KEYS = ("TP", "FP", "TN", "FN", "n", "missing_preds", "masked_outliers")


def metrics_table(metrics_by_subset: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Subsets as rows, metrics as columns."""
    df = pd.DataFrame({name: {k: m.get(k, np.nan) for k in _TABLE_KEYS} for name, m in metrics_by_subset.items()}).T
    df.index.name = "subset"
    return df


def _markdown(df: pd.DataFrame) -> str:
    cols = [df.index.name or ""] + list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = []
        for col, value in row.items():
            if col in _COUNT_KEYS:
                cells.append("" if pd.isna(value) else str(int(value)))
            else:
                cells.append("nan" if pd.isna(value) else f"{value:.4f}")
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_tables(metrics_by_subset, out_dir, stem: str = "metrics") -> Dict[str, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = metrics_table(metrics_by_subset)
    md, csv = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(_markdown(df))
    df.to_csv(csv)
    return {"markdown": md, "csv": csv}


def cumulative_precision_daf(e_hull_true, e_hull_pred, threshold: float = STABILITY_THRESHOLD,
                             prevalence: Optional[float] = None) -> pd.DataFrame:
    """Precision and DAF of the top-k materials ranked by predicted hull distance, for every k.

    Missing predictions are ranked last. Columns: ``k``, ``precision`` (fraction of the k truly stable),
    ``daf`` (precision / prevalence).
    """
    true = np.asarray(e_hull_true, float)
    pred = np.asarray(e_hull_pred, float)
    order = np.argsort(np.where(np.isnan(pred), np.inf, pred), kind="stable")
    stable = (true[order] <= threshold).astype(float)
    k = np.arange(1, len(true) + 1)
    precision = np.cumsum(stable) / k
    prevalence = float((true <= threshold).mean()) if prevalence is None else prevalence
    daf = precision / prevalence if prevalence > 0 else np.full_like(precision, np.nan)
    return pd.DataFrame({"k": k, "precision": precision, "daf": daf})


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parity(e_form_true, e_form_pred, path, title: str = "") -> Path:
    """Predicted vs DFT formation energy (eV/atom) with MAE in the legend."""
    plt = _figure()
    true, pred = np.asarray(e_form_true, float), np.asarray(e_form_pred, float)
    ok = ~(np.isnan(true) | np.isnan(pred))
    mae = np.abs(true[ok] - pred[ok]).mean() if ok.any() else np.nan
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(true[ok], pred[ok], s=6, alpha=0.6, label=f"MAE {mae:.4f} eV/atom (n={ok.sum()})")
    lo, hi = np.nanmin([true[ok].min(), pred[ok].min()]), np.nanmax([true[ok].max(), pred[ok].max()])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("DFT formation energy (eV/atom)")
    ax.set_ylabel("predicted formation energy (eV/atom)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_hull_error_histogram(e_hull_true, e_hull_pred, path, title: str = "") -> Path:
    """Histogram of predicted minus DFT hull distance (eV/atom)."""
    plt = _figure()
    err = np.asarray(e_hull_pred, float) - np.asarray(e_hull_true, float)
    err = err[~np.isnan(err)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(err, bins=60, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("predicted - DFT hull distance (eV/atom)")
    ax.set_ylabel("count")
    ax.set_title(title or f"mean {err.mean():+.4f}, MAE {np.abs(err).mean():.4f} eV/atom")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_cumulative(e_hull_true, e_hull_pred, path, threshold: float = STABILITY_THRESHOLD,
                    prevalence: Optional[float] = None, title: str = "") -> Path:
    """Cumulative precision and DAF along the list ranked by predicted hull distance."""
    plt = _figure()
    curve = cumulative_precision_daf(e_hull_true, e_hull_pred, threshold, prevalence)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.k, curve.precision, label="precision", color="tab:blue")
    ax.set_xlabel("materials screened (ranked by predicted hull distance)")
    ax.set_ylabel("cumulative precision")
    ax.set_ylim(0, 1.05)
    twin = ax.twinx()
    twin.plot(curve.k, curve.daf, label="DAF", color="tab:orange")
    twin.set_ylabel("cumulative DAF")
    n_pred_stable = int((np.asarray(e_hull_pred, float) <= threshold).sum())
    ax.axvline(n_pred_stable, color="gray", ls=":", lw=0.8)
    ax.set_title(title)
    fig.legend(loc="upper right", bbox_to_anchor=(0.86, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def write_report(labels: pd.DataFrame, e_form_pred: pd.Series, out_dir, metrics_by_subset=None,
                 e_form_col: str = "e_form_per_atom_mp2020_corrected",
                 e_hull_col: str = "e_above_hull_mp2020_corrected_ppd_mp", title: str = "") -> Dict[str, Path]:
    """Metrics tables and the three plots for predictions against labels (full set)."""
    from .metrics import discovery_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if metrics_by_subset is None:
        metrics_by_subset = discovery_metrics(labels, e_form_pred, e_form_col=e_form_col, e_hull_col=e_hull_col)
    paths = write_metrics_tables(metrics_by_subset, out_dir)
    pred = pd.to_numeric(e_form_pred.reindex(labels.index), errors="coerce")
    e_hull_pred = labels[e_hull_col] + pred - labels[e_form_col]
    paths["parity"] = plot_parity(labels[e_form_col], pred, out_dir / "e_form_parity.png", title)
    paths["hull_error"] = plot_hull_error_histogram(labels[e_hull_col], e_hull_pred, out_dir / "hull_error_hist.png")
    paths["cumulative"] = plot_cumulative(labels[e_hull_col], e_hull_pred, out_dir / "cumulative_precision_daf.png",
                                          title=title)
    return paths
