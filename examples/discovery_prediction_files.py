"""Read the published MACE-MP-0 and CHGNet-0.3.0 WBM prediction files and check what can be checked offline.

The WBM labels (``wbm-summary.csv.gz``) are not available here, so F1/DAF/MAE against DFT cannot be recomputed;
with the summary file, ``matkit discovery metrics <preds.csv> --labels wbm-summary.csv.gz`` gives them. This
script checks the files' format and coverage through matkit's readers, the number of missing predictions (which
count as unstable), and a consistency bound: by the triangle inequality MAE(MACE - CHGNet) <= MAE(MACE - DFT) +
MAE(CHGNet - DFT), with the leaderboard's full-test-set MAEs.

    PYTHONPATH=. python examples/discovery_prediction_files.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from matkit.discovery.io import read_predictions

#: the prediction files (not in the repository: 10-20 MB each); $MATKIT_DISCOVERY_DATA or --data overrides
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "matbench_discovery"
N_WBM = 256_963  # size of the cleaned WBM test set


def main(argv=None):
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MATKIT_DISCOVERY_DATA", DEFAULT_DATA)),
                        help="folder with the prediction files (default $MATKIT_DISCOVERY_DATA, else "
                             "../shared/data/matbench_discovery next to the repository)")
    args = parser.parse_args(argv)
    data = args.data
    mace = read_predictions(data / "2023-12-11-mace-mp-0-wbm-IS2RE-FIRE.csv.gz")
    chgnet = read_predictions(data / "2023-12-21-chgnet-0.3.0-wbm-IS2RE.csv.gz")
    mock = read_predictions(data / "mock-wbm-energy-preds.csv.gz")
    both = mace.index.intersection(chgnet.index)
    diff = (mace.loc[both] - chgnet.loc[both]).to_numpy()
    summary = {
        "mace_mp_0": {"column": mace.name, "rows": len(mace), "missing_vs_wbm": N_WBM - len(mace),
                      "ids_not_in_chgnet_file": int(len(mace.index.difference(chgnet.index)))},
        "chgnet_0.3.0": {"column": chgnet.name, "rows": len(chgnet), "missing_vs_wbm": N_WBM - len(chgnet)},
        "upstream_mock_fixture": {"column": mock.name, "rows": len(mock)},
        "mace_minus_chgnet_e_form": {"n": int(len(both)), "MAE": float(np.abs(diff).mean()),
                                     "mean": float(diff.mean()), "RMSE": float(np.sqrt((diff ** 2).mean()))},
        "note": "Leaderboard (unique prototypes) MAE: MACE-MP-0 0.057, CHGNet 0.063 eV/atom; "
                "triangle bound on MAE(MACE-CHGNet) is 0.120 (full set MAEs are similar). "
                "F1/DAF need the WBM summary, which is not available offline.",
    }
    out = Path("examples/results/prediction_files_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
