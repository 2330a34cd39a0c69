"""Discovery metrics with Matbench Discovery's exact definitions (``matbench_discovery/metrics/discovery.py``,
snapshot 2c7f9fc; reimplemented, MIT, after Janosh Riebesell).

* true stable  <=> ``e_above_hull_true <= threshold`` (0 eV/atom): a tie at 0 counts as stable;
  true unstable <=> ``> threshold``; a NaN true value is neither;
* predicted stable <=> ``e_above_hull_pred <= threshold``; a missing (NaN) prediction counts as predicted
  **unstable** (``fillna=True``);
* Precision = TP/(TP+FP), Recall = TPR = TP/(TP+FN), F1 = 2PR/(P+R), Accuracy = (TP+TN)/(all labelled),
  FPR = FP/(FP+TN), TNR = TN/(TN+FP), FNR = FN/(TP+FN); undefined ratios are NaN;
* DAF = Precision / prevalence, prevalence = fraction truly stable (for the unique-prototype and most-stable
  subsets upstream fixes it to the unique-prototype prevalence);
* MAE, RMSE, R2 on the hull distance over rows where both values are present (R2 as ``sklearn.r2_score``:
  a constant truth gives 1 for a perfect fit, else 0).

Before that, :func:`discovery_metrics` applies upstream's two cleaning steps (``matbench_discovery.data.
load_df_wbm_with_preds`` and ``load_discovery_predictions``), both on by default and switchable:

* outlier mask: a predicted formation energy more than ``max_error`` (5 eV/atom) from the DFT one is treated as
  failed (set missing: counted as predicted unstable, left out of MAE/RMSE/R2); how many were masked is
  reported per subset (``masked_outliers``);
* rounding: DFT formation energies, DFT hull distances and predictions are rounded to 3 decimals (``decimals``)
  before the predicted hull distance ``e_hull_dft + e_form_pred - e_form_dft`` is formed and classified.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

__all__ = ["STABILITY_THRESHOLD", "MAX_E_FORM_ERROR", "ROUND_DECIMALS", "classify_stable", "stable_metrics",
           "r2_score", "discovery_metrics", "METRIC_KEYS"]

STABILITY_THRESHOLD = 0.0
#: upstream's outlier mask: |e_form_pred - e_form_dft| above this (eV/atom) counts as a failed prediction
MAX_E_FORM_ERROR = 5.0
#: upstream rounds labels and predictions to this many decimals (eV/atom) before classifying
ROUND_DECIMALS = 3
METRIC_KEYS = ("F1", "DAF", "Precision", "Recall", "Accuracy", "TPR", "FPR", "TNR", "FNR", "TP", "FP", "TN", "FN",
               "MAE", "RMSE", "R2", "n", "missing_preds", "masked_outliers")


def _numeric(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values).reset_index(drop=True), errors="coerce").to_numpy(dtype=float)


def classify_stable(each_true, each_pred, stability_threshold: float = STABILITY_THRESHOLD, fillna: bool = True):
    """Boolean arrays (TP, FN, FP, TN) of the stability classification (see module docstring)."""
    true, pred = _numeric(each_true), _numeric(each_pred)
    if len(true) != len(pred):
        raise ValueError(f"each_true has {len(true)} values but each_pred has {len(pred)}")
    if stability_threshold is None or not np.isfinite(stability_threshold):
        raise ValueError(f"stability_threshold must be a finite number, got {stability_threshold}")
    with np.errstate(invalid="ignore"):
        actual_pos, actual_neg = true <= stability_threshold, true > stability_threshold
        model_pos, model_neg = pred <= stability_threshold, pred > stability_threshold
    if fillna:
        missing = np.isnan(pred)
        model_pos, model_neg = model_pos & ~missing, model_neg | missing
    return actual_pos & model_pos, actual_pos & model_neg, actual_neg & model_pos, actual_neg & model_neg


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination, as ``sklearn.metrics.r2_score`` (force_finite=True)."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    ss_res = float(((y_true - y_pred) ** 2).sum())
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def stable_metrics(each_true, each_pred, stability_threshold: float = STABILITY_THRESHOLD, fillna: bool = True,
                   prevalence: Optional[float] = None) -> Dict[str, float]:
    """Classification and regression metrics of predicted vs true hull distances (eV/atom).

    ``prevalence`` overrides the fraction of truly stable materials used for the DAF (upstream fixes it for
    the unique-prototype subsets); by default it is computed from ``each_true``.
    """
    tp, fn, fp, tn = (int(m.sum()) for m in classify_stable(each_true, each_pred, stability_threshold, fillna))
    n_pos, n_neg = tp + fn, tn + fp
    own_prevalence = _ratio(n_pos, n_pos + n_neg)
    prevalence = own_prevalence if prevalence is None else float(prevalence)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, n_pos)
    true, pred = _numeric(each_true), _numeric(each_pred)
    both = ~(np.isnan(true) | np.isnan(pred))
    err = true[both] - pred[both]
    f1 = float("nan") if not (precision + recall > 0) else 2 * precision * recall / (precision + recall)
    return dict(
        F1=f1, DAF=precision / prevalence if prevalence > 0 else float("nan"),
        Precision=precision, Recall=recall, Accuracy=_ratio(tp + tn, n_pos + n_neg),
        TPR=recall, FPR=_ratio(fp, n_neg), TNR=_ratio(tn, n_neg), FNR=_ratio(fn, n_pos),
        TP=tp, FP=fp, TN=tn, FN=fn,
        MAE=float(np.abs(err).mean()) if err.size else float("nan"),
        RMSE=float(np.sqrt((err ** 2).mean())) if err.size else float("nan"),
        R2=r2_score(true[both], pred[both]) if err.size > 1 else float("nan"),
        n=len(true), missing_preds=int(np.isnan(pred).sum()),
    )


def discovery_metrics(labels: pd.DataFrame, e_form_pred: pd.Series, *,
                      e_form_col: str = "e_form_per_atom_mp2020_corrected",
                      e_hull_col: str = "e_above_hull_mp2020_corrected_ppd_mp", uniq_col: str = "unique_prototype",
                      most_stable: Optional[int] = None, stability_threshold: float = STABILITY_THRESHOLD,
                      max_error: Optional[float] = MAX_E_FORM_ERROR,
                      decimals: Optional[int] = ROUND_DECIMALS) -> Dict[str, Dict[str, float]]:
    """Metrics per test subset, as upstream ``calc_discovery_metrics`` after its cleaning steps.

    labels : DataFrame indexed by material id with the DFT formation energy, DFT hull distance and optionally
        the ``unique_prototype`` bool column. e_form_pred : predicted formation energies (eV/atom) indexed by
        material id; ids absent from it are missing predictions (counted unstable); ids not in ``labels`` are
        an error. Subsets: ``full_test_set``; ``unique_prototypes`` when the column exists;
        ``most_stable_<k>`` (k lowest predicted hull distances among unique prototypes, or all) if requested.
    max_error : outlier mask threshold (eV/atom; None: no mask). decimals : rounding before classification
        (None: no rounding). See the module docstring.
    """
    for col in (e_form_col, e_hull_col):
        if col not in labels:
            raise KeyError(f"labels lack column {col!r}; columns: {list(labels.columns)}")
    if labels.index.has_duplicates:
        raise ValueError(f"labels have duplicate ids: {labels.index[labels.index.duplicated()][:10].tolist()}")
    unknown = e_form_pred.index.difference(labels.index)
    if len(unknown):
        raise ValueError(f"{len(unknown)} predictions have ids not in the labels, e.g. {unknown[:5].tolist()}")
    if e_form_pred.index.has_duplicates:
        raise ValueError(f"duplicate prediction ids: {e_form_pred.index[e_form_pred.index.duplicated()][:10].tolist()}")
    if max_error is not None and not (np.isfinite(max_error) and max_error >= 0):
        raise ValueError(f"max_error must be a number >= 0 or None, got {max_error}")
    preds = pd.to_numeric(e_form_pred.reindex(labels.index), errors="coerce")
    e_form_dft = labels[e_form_col].astype(float)
    masked = pd.Series(False, index=labels.index)
    if max_error is not None:
        masked = (preds - e_form_dft).abs() > max_error
        preds = preds.mask(masked)
    each_true = labels[e_hull_col].astype(float)
    if decimals is not None:
        preds, e_form_dft, each_true = preds.round(decimals), e_form_dft.round(decimals), each_true.round(decimals)
    each_pred = each_true + preds - e_form_dft
    subsets = {"full_test_set": labels.index}
    fixed_prevalence = None
    if uniq_col in labels:
        uniq = labels.index[labels[uniq_col].astype(bool).to_numpy()]
        subsets["unique_prototypes"] = uniq
        fixed_prevalence = float((each_true.loc[uniq] <= stability_threshold).mean())
    if most_stable:
        pool = subsets.get("unique_prototypes", labels.index)
        subsets[f"most_stable_{most_stable}"] = each_pred.loc[pool].nsmallest(most_stable).index
    out = {}
    for name, index in subsets.items():
        prevalence = fixed_prevalence if name != "full_test_set" else None
        out[name] = stable_metrics(each_true.loc[index], each_pred.loc[index], stability_threshold,
                                   prevalence=prevalence)
        out[name]["masked_outliers"] = int(masked.loc[index].sum())
    return out
