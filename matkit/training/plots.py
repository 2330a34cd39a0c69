"""Parity plots (model vs reference) of per-atom energies and force components, written as PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

__all__ = ["parity_plot", "write_parity_plots"]


def parity_plot(pred: np.ndarray, ref: np.ndarray, path, title: str, unit: str) -> Path:
    """Scatter ``pred`` against ``ref`` with the y = x line, MAE and RMSE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    diff = pred - ref
    mae = float(np.abs(diff).mean()) if len(diff) else float("nan")
    rmse = float(np.sqrt((diff ** 2).mean())) if len(diff) else float("nan")
    ax.scatter(ref, pred, s=6, alpha=0.6, label=f"MAE {mae:.4g}\nRMSE {rmse:.4g} {unit}")
    if len(ref):
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"model ({unit})")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_parity_plots(arrays: Dict[str, np.ndarray], out_dir, label: str = "validation") -> List[Path]:
    """``parity_energy.png`` (eV/atom) and ``parity_forces.png`` (eV/Å) from :class:`Predictions` arrays."""
    out_dir = Path(out_dir)
    paths = []
    if len(arrays["energy_ref"]):
        paths.append(parity_plot(arrays["energy_pred"], arrays["energy_ref"], out_dir / "parity_energy.png",
                                 f"energy per atom ({label})", "eV/atom"))
    if len(arrays["forces_ref"]):
        paths.append(parity_plot(arrays["forces_pred"], arrays["forces_ref"], out_dir / "parity_forces.png",
                                 f"force components ({label})", "eV/Å"))
    return paths
