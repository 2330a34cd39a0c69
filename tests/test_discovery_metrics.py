"""Discovery metrics against hand-worked values (upstream definitions, incl. ties at 0 and missing predictions)."""
import math

import numpy as np
import pandas as pd
import pytest

from matkit.discovery.metrics import classify_stable, discovery_metrics, r2_score, stable_metrics
from matkit.discovery.report import cumulative_precision_daf

# true / predicted hull distances (eV/atom); rows 2 and 3 tie at 0, rows 5 and 6 have no prediction
TRUE = [-0.10, 0.00, 0.00, 0.05, 0.20, -0.02, 0.10, 0.30]
PRED = [-0.05, 0.00, 0.01, -0.01, np.nan, np.nan, 0.05, 0.25]
# by hand:  1 TP | 2 TP (tie at 0 is stable on both sides) | 3 FN | 4 FP | 5 TN (NaN -> unstable)
#           6 FN (NaN -> unstable) | 7 TN | 8 TN      => TP=2, FN=2, FP=1, TN=3


def test_confusion_counts_with_ties_and_missing():
    tp, fn, fp, tn = classify_stable(TRUE, PRED)
    assert tp.tolist() == [True, True, False, False, False, False, False, False]
    assert fn.tolist() == [False, False, True, False, False, True, False, False]
    assert fp.tolist() == [False, False, False, True, False, False, False, False]
    assert tn.tolist() == [False, False, False, False, True, False, True, True]


def test_stable_metrics_hand_worked():
    m = stable_metrics(TRUE, PRED)
    precision, recall = 2 / 3, 1 / 2
    expected = {
        "TP": 2, "FN": 2, "FP": 1, "TN": 3,
        "Precision": precision, "Recall": recall, "TPR": recall,
        "F1": 4 / 7,  # 2 * (2/3 * 1/2) / (2/3 + 1/2)
        "Accuracy": 5 / 8, "FPR": 1 / 4, "TNR": 3 / 4, "FNR": 1 / 2,
        "DAF": (2 / 3) / (4 / 8),  # precision / prevalence (4 of 8 truly stable)
        # regression on the 6 rows with a prediction: errors -0.05, 0, -0.01, 0.06, 0.05, 0.05
        "MAE": 0.22 / 6, "RMSE": math.sqrt(0.0112 / 6),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    true6 = np.array([-0.10, 0.00, 0.00, 0.05, 0.10, 0.30])
    ss_tot = sum((t - true6.sum() / 6) ** 2 for t in true6)
    assert m["R2"] == pytest.approx(1 - 0.0112 / ss_tot, abs=1e-12)
    assert m["missing_preds"] == 2 and m["n"] == 8


def test_fillna_false_drops_missing_from_classification():
    m = stable_metrics(TRUE, PRED, fillna=False)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (2, 1, 1, 2)


def test_threshold_and_undefined_ratios():
    # nothing predicted stable: precision undefined (NaN), F1 NaN, DAF NaN, recall 0
    m = stable_metrics([-0.1, 0.1], [0.2, 0.3])
    assert math.isnan(m["Precision"]) and math.isnan(m["F1"]) and math.isnan(m["DAF"]) and m["Recall"] == 0
    # a positive threshold moves the ties
    m = stable_metrics([0.04, 0.06], [0.05, 0.05], stability_threshold=0.05)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 0, 1, 0)
    with pytest.raises(ValueError, match="each_true has 2 values but each_pred has 1"):
        stable_metrics([0.0, 1.0], [0.0])


def test_r2_matches_sklearn_conventions():
    assert r2_score(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 1.0
    assert r2_score(np.array([1.0, 1.0]), np.array([1.0, 2.0])) == 0.0
    assert r2_score(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 3.0])) == pytest.approx(0.5, abs=1e-15)


def test_discovery_metrics_subsets_and_fixed_prevalence():
    ids = [f"wbm-1-{k}" for k in range(1, 9)]
    e_form_dft = np.linspace(-1.0, 0.4, 8)
    labels = pd.DataFrame({"e_form_per_atom_mp2020_corrected": e_form_dft,
                           "e_above_hull_mp2020_corrected_ppd_mp": TRUE,
                           "unique_prototype": [True, True, False, True, True, False, True, True]}, index=ids)
    # e_form predictions reproducing PRED as hull distances; rows 5 and 6 absent from the file (missing)
    pred_hull = pd.Series(PRED, index=ids)
    e_form_pred = (pred_hull - labels["e_above_hull_mp2020_corrected_ppd_mp"] + e_form_dft).dropna()
    out = discovery_metrics(labels, e_form_pred, most_stable=3)
    full = out["full_test_set"]
    assert (full["TP"], full["FN"], full["FP"], full["TN"]) == (2, 2, 1, 3)
    assert full["F1"] == pytest.approx(4 / 7, abs=1e-12)
    uniq = out["unique_prototypes"]  # rows 1 2 4 5 7 8: TP TP FP TN TN TN
    assert (uniq["TP"], uniq["FN"], uniq["FP"], uniq["TN"]) == (2, 0, 1, 3)
    assert uniq["DAF"] == pytest.approx((2 / 3) / (2 / 6), abs=1e-12)
    top = out["most_stable_3"]  # lowest predicted among unique: rows 1 (-0.05), 4 (-0.01), 2 (0.00)
    assert (top["TP"], top["FP"]) == (2, 1)
    assert top["DAF"] == pytest.approx((2 / 3) / (2 / 6), abs=1e-12)  # unique-prototype prevalence
    with pytest.raises(ValueError, match="not in the labels"):
        discovery_metrics(labels, pd.Series([0.1], index=["wbm-9-9"]))


def test_cumulative_precision_ranks_missing_last():
    curve = cumulative_precision_daf(TRUE, PRED)
    # ranking by predicted hull: rows 1(-0.05) 4(-0.01) 2(0.00) 3(0.01) 7 8 then the NaNs 5 6
    assert curve.precision.tolist()[:4] == pytest.approx([1.0, 0.5, 2 / 3, 3 / 4], abs=1e-12)
    assert curve.daf.iloc[0] == pytest.approx(2.0, abs=1e-12)


def _labels(e_form, e_hull):
    ids = [f"wbm-2-{k}" for k in range(len(e_form))]
    return pd.DataFrame({"e_form_per_atom_mp2020_corrected": e_form, "e_above_hull_mp2020_corrected_ppd_mp": e_hull},
                        index=ids)


def test_outlier_mask_treats_far_predictions_as_failed():
    """Upstream masks |e_form_pred - e_form_dft| > 5 eV/atom: such a prediction counts as missing (unstable) and
    leaves the MAE. Hand-worked: row 1 predicted 6.5 eV/atom too low would be a false positive."""
    labels = _labels([-1.0, -0.5, 0.2], [0.0, 0.05, 0.3])
    preds = pd.Series([-1.0, -7.0, 0.25], index=labels.index)
    masked = discovery_metrics(labels, preds)["full_test_set"]
    assert (masked["TP"], masked["FP"], masked["TN"], masked["FN"]) == (1, 0, 2, 0)
    assert masked["masked_outliers"] == 1 and masked["missing_preds"] == 1
    assert masked["MAE"] == pytest.approx((0.0 + 0.05) / 2, abs=1e-12)
    raw = discovery_metrics(labels, preds, max_error=None)["full_test_set"]
    assert (raw["TP"], raw["FP"], raw["TN"], raw["FN"]) == (1, 1, 1, 0)
    assert raw["masked_outliers"] == 0 and raw["MAE"] == pytest.approx((0.0 + 6.5 + 0.05) / 3, abs=1e-12)
    # exactly 5 eV/atom off is kept (upstream: strictly greater than the threshold)
    edge = discovery_metrics(labels, pd.Series([-1.0, 4.5, 0.25], index=labels.index))["full_test_set"]
    assert edge["masked_outliers"] == 0
    with pytest.raises(ValueError, match="max_error"):
        discovery_metrics(labels, preds, max_error=-1.0)


def test_rounding_to_three_decimals_before_classification():
    """Upstream rounds labels and predictions to 3 decimals: 0.0004 eV/atom above the hull becomes 'on the hull'."""
    labels = _labels([-1.0, -1.0], [0.0004, 0.0])
    preds = pd.Series([-1.0, -0.9996], index=labels.index)  # predicted hull distances 0.0004 and 0.0004
    rounded = discovery_metrics(labels, preds)["full_test_set"]
    assert (rounded["TP"], rounded["FP"], rounded["TN"], rounded["FN"]) == (2, 0, 0, 0)
    exact = discovery_metrics(labels, preds, decimals=None)["full_test_set"]
    assert (exact["TP"], exact["FP"], exact["TN"], exact["FN"]) == (0, 0, 1, 1)
