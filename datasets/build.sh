#!/usr/bin/env bash
# Rebuild every dataset in this folder from the offline copies of the public sources (../shared/data, or
# SRC=/path/to/data). Each command states the source format; the converters convert units and stress signs
# (see datasets/README.md and `matkit data convert --help`).
set -euo pipefail
cd "$(dirname "$0")"
SRC=${SRC:-../../shared/data}
MATKIT=${MATKIT:-../.venv/bin/matkit}
convert() { "$MATKIT" data convert "$@" --no-progress; }

for el in Si Ge Mo Li; do
  lower=$(echo "$el" | tr 'A-Z' 'a-z')
  convert "$SRC/mlearn_elemental/$el/training.json" "mlearn_$lower.h5" --format mlearn \
    --license BSD-3-Clause --note "mlearn (Zuo et al., J. Phys. Chem. A 2020) $el training.json; VASP PBE"
done

BOTNET_NOTE="BOTNet datasets (Batatia et al. 2022, github.com/davkovacs/BOTNet-datasets); DFT energies/forces, eV, eV/Å"
convert "$SRC/botnet_molecules/dataset_acac/train_300K.xyz" acetylacetone_300K.h5 --format extxyz \
  --energy-key energy --forces-key forces --license MIT --note "$BOTNET_NOTE; acetylacetone train_300K"
convert "$SRC/botnet_molecules/dataset_acac/train_600K.xyz" acetylacetone_600K.h5 --format extxyz \
  --energy-key energy --forces-key forces --license MIT --note "$BOTNET_NOTE; acetylacetone train_600K"
convert "$SRC/botnet_molecules/dataset_ethanol/train.xyz" ethanol.h5 --format extxyz \
  --energy-key energy --forces-key forces --license MIT --note "$BOTNET_NOTE; ethanol train"
convert "$SRC/botnet_molecules/dataset_3BPA/train_300K.xyz" 3bpa_300K.h5 --format extxyz \
  --energy-key energy --forces-key forces --license MIT --note "$BOTNET_NOTE; 3BPA train_300K"

convert "$SRC"/deepmd_water/data/data_{0,1,2,3} water_deepmd.h5 --format deepmd --license LGPL-3.0 \
  --note "DeePMD-kit liquid water example (64 H2O); energies eV, forces eV/Å"

convert "$SRC/mptrj_orb_fixtures/10_mptraj_systems.db" "$SRC/mptrj_orb_fixtures/10_thin_mp_traj_systems.db" \
  mptrj_frames.h5 --format asedb --license Apache-2.0 --note "MPtrj frames from the orb-models test fixtures"

convert "$SRC/cdvae_mp20_subset/train.csv" mp20_train.h5 --format mp20csv --license "MIT (CDVAE) / CC-BY-4.0 (MP)" \
  --note "CDVAE MP-20 subset, train.csv: relaxed MP structures, formation energy and e_above_hull (eV/atom)"
convert "$SRC/cdvae_mp20_subset/val.csv" mp20_val.h5 --format mp20csv --license "MIT (CDVAE) / CC-BY-4.0 (MP)" \
  --note "CDVAE MP-20 subset, val.csv: relaxed MP structures, formation energy and e_above_hull (eV/atom)"
