#!/usr/bin/env bash
# Train a potential from an HDF5 dataset and evaluate it (a few minutes on 2 CPU cores with the defaults).
#
#   examples/train_and_evaluate.sh                      # TensorNet on datasets/mlearn_si.h5, 10 epochs
#   EPOCHS=100 MODEL=gaunt_mace examples/train_and_evaluate.sh
#   DATA=datasets/acetylacetone_300K.h5 examples/train_and_evaluate.sh
#
# Uses the full reference configuration examples/train_config.yaml with command-line overrides; the bundled
# potentials in potentials/*/config.yaml are trained the same way with more epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
MATKIT=${MATKIT:-$( [ -x .venv/bin/matkit ] && echo .venv/bin/matkit || echo matkit )}
MODEL=${MODEL:-tensornet}
DATA=${DATA:-datasets/mlearn_si.h5}
EPOCHS=${EPOCHS:-10}
OUT=${OUT:-runs/example_${MODEL}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

case "$MODEL" in   # small CPU-friendly sizes; drop these overrides to use each model's defaults
  tensornet)  HP="model.hparams={cutoff: 5.0, hidden_channels: 32, num_layers: 2, num_rbf: 32}" ;;
  faenet)     HP="model.hparams={cutoff: 5.0, hidden: 64, filters: 64, num_interactions: 3}" ;;
  gaunt_mace) HP="model.hparams={cutoff: 5.0, num_channels: 16, max_ell: 2, hidden_lmax: 1}" ;;
  escn)       HP="model.hparams={cutoff: 5.0, lmax: 2, mmax: 1, sphere_channels: 16, hidden_channels: 16, edge_channels: 16}" ;;
  *)          HP="model.hparams={}" ;;
esac

# 1. train: a seeded 10 % validation split of DATA is held out (no test split ships with this data)
"$MATKIT" train examples/train_config.yaml "model.name=$MODEL" "$HP" "data.train=$DATA" \
  "optim.epochs=$EPOCHS" "optim.warmup_steps=20" "run.out_dir=$OUT" "run.progress='off'"
# 2. evaluate the best (EMA) weights on the held-out split, in float64
"$MATKIT" evaluate "$OUT/best.pt" "$DATA" --split val --dtype float64 --json "$OUT/val_errors.json" --no-progress
echo "parity plots: $OUT/parity_energy.png $OUT/parity_forces.png; learning curve: $OUT/metrics.csv"
