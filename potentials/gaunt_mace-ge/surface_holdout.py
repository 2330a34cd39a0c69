"""Surfaces the model has not seen: hold 4 of the 11 training surface slabs of mlearn Ge out of training.

The validation split of ``datasets/mlearn_ge.h5`` (10 %, seed 0, the split every Ge card uses) holds no surface slab,
so validation errors say nothing about surface energies. This writes six files into OUT (default
``runs/surface_holdout``):

* ``ge_train_no4.h5``: the usual training split without 4 of its 11 surfaces (every second, from the first);
* ``ge_val.h5``: the usual validation split;
* ``ge_surfaces_held4.h5``: the 4 held-out surfaces;
* ``ge_train_no4_isolated.h5``: ``ge_train_no4.h5`` plus one lone Ge atom at ``ISOLATED_GE`` eV (zero force);
* ``ge_train_no4_shifted.h5`` and ``ge_surfaces_held4_shifted.h5``: the same with every surface slab's energy raised
  by ``SURFACE_SHIFT`` eV per atom.

``ISOLATED_GE``: MatPES PBE's isolated-atom energy of Ge (-0.779 eV, the Ge reference energy of
``tensornet-matpes-pbe``) plus the median per-atom offset of mlearn's Ge bulk structures (all but the slabs) from
``tensornet-matpes-pbe`` (-0.045 eV). ``SURFACE_SHIFT``: the slabs' median offset from that model (-0.161 eV/atom)
minus the bulk's; see tensornet-ge's card ("Unseen surfaces: depth, an isolated atom, and the energy scale of the Ge
slabs").

Then train on them, from the repository root (CPU, one thread, ~35 min each; the training configurations are the
potentials' own, pointed at these files by overrides)::

    python potentials/gaunt_mace-ge/surface_holdout.py
    DATA="data.train=runs/surface_holdout/ge_train_no4.h5 data.val=runs/surface_holdout/ge_val.h5"
    # Gaunt MACE (stage 1 of gaunt_mace-ge, 250 epochs), without and with the 7 remaining surfaces weighted x10
    matkit train potentials/gaunt_mace-ge/stage1.yaml $DATA optim.epochs=250 run.out_dir=runs/surface_holdout/unweighted
    matkit train potentials/gaunt_mace-ge/stage1.yaml $DATA optim.epochs=250 \
        "loss.config_type_weights={Surface: 10.0}" run.out_dir=runs/surface_holdout/surfaces_x10
    # TensorNet: tensornet-ge's recipe from scratch, and the universal potential fine-tuned (examples/finetune/ge.yaml)
    matkit train potentials/tensornet-ge/config.yaml $DATA run.out_dir=runs/surface_holdout/tensornet_scratch
    matkit train examples/finetune/ge.yaml $DATA run.out_dir=runs/surface_holdout/tensornet_finetuned
    # TensorNet with one interaction layer; with the lone atom; with the slabs' energies shifted
    matkit train potentials/tensornet-ge/config.yaml $DATA model.hparams.num_layers=1 \
        run.out_dir=runs/surface_holdout/tn_1layer
    matkit train potentials/tensornet-ge/config.yaml data.train=runs/surface_holdout/ge_train_no4_isolated.h5 \
        data.val=runs/surface_holdout/ge_val.h5 run.out_dir=runs/surface_holdout/tn_isolated
    matkit train potentials/tensornet-ge/config.yaml data.train=runs/surface_holdout/ge_train_no4_shifted.h5 \
        data.val=runs/surface_holdout/ge_val.h5 run.out_dir=runs/surface_holdout/tn_shifted
    # Gaunt MACE with one interaction; with the slabs' energies shifted
    matkit train potentials/gaunt_mace-ge/stage1.yaml $DATA optim.epochs=250 model.hparams.num_interactions=1 \
        run.out_dir=runs/surface_holdout/gm_1int
    matkit train potentials/gaunt_mace-ge/stage1.yaml data.train=runs/surface_holdout/ge_train_no4_shifted.h5 \
        data.val=runs/surface_holdout/ge_val.h5 optim.epochs=250 run.out_dir=runs/surface_holdout/gm_shifted
    matkit evaluate runs/surface_holdout/unweighted/best.pt runs/surface_holdout/ge_surfaces_held4.h5 --dtype float64
    # (the shifted runs against ge_surfaces_held4_shifted.h5)

The results are in the cards of gaunt_mace-ge ("Surfaces it has not seen"; "More channels, higher hidden L, one
interaction, and the slabs' energy scale") and tensornet-ge ("Surfaces it has not seen, from scratch and fine-tuned";
"Unseen surfaces: depth, an isolated atom, and the energy scale of the Ge slabs").
"""
import argparse
import dataclasses
from pathlib import Path

import numpy as np

from matkit.data.dataset import random_split_indices
from matkit.data.hdf5 import FrameFile, HDF5Writer
from matkit.data.schema import Frame

DATA = "datasets/mlearn_ge.h5"
ISOLATED_GE = -0.824    # eV, a lone Ge atom on mlearn's energy scale (estimate, see above)
SURFACE_SHIFT = 0.116   # eV/atom added to every slab's energy in the *_shifted files


def lone_atom(energy: float) -> Frame:
    return Frame(positions=np.zeros((1, 3)), atomic_numbers=np.array([32]), cell=np.zeros((3, 3)),
                 pbc=np.zeros(3, bool), energy=energy, forces=np.zeros((1, 3)), id="isolated-Ge", group="Isolated",
                 source="lone Ge atom, estimated energy (surface_holdout.py)")


def shifted(frame: Frame) -> Frame:
    if frame.group != "Surface":
        return frame
    return dataclasses.replace(frame, energy=frame.energy + SURFACE_SHIFT * frame.n_atoms)


def write(path: Path, frames: list, provenance: dict) -> None:
    with HDF5Writer(path, license="BSD-3-Clause", provenance={"input": DATA, **provenance}) as writer:
        for frame in frames:
            writer.add(frame)
    print(f"{path}: {len(frames)} structures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/surface_holdout", help="output folder (default: %(default)s)")
    args = parser.parse_args()

    data = FrameFile(DATA)
    # the trainer's split for val_fraction 0.1, seed 0, as plain ints
    train, val = ([int(i) for i in split] for split in random_split_indices(len(data), 0.1, seed=0))
    frames = {i: data[i] for i in (*train, *val)}                    # each frame read once
    held = [i for i in train if frames[i].group == "Surface"][::2][:4]
    rest = [i for i in train if i not in held]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "ge_train_no4.h5", [frames[i] for i in rest], {"frames": rest})
    write(out / "ge_val.h5", [frames[i] for i in val], {"frames": val})
    write(out / "ge_surfaces_held4.h5", [frames[i] for i in held], {"frames": held})
    write(out / "ge_train_no4_isolated.h5", [frames[i] for i in rest] + [lone_atom(ISOLATED_GE)],
          {"frames": rest, "lone_atom_eV": ISOLATED_GE})
    write(out / "ge_train_no4_shifted.h5", [shifted(frames[i]) for i in rest],
          {"frames": rest, "surface_shift_eV_per_atom": SURFACE_SHIFT})
    write(out / "ge_surfaces_held4_shifted.h5", [shifted(frames[i]) for i in held],
          {"frames": held, "surface_shift_eV_per_atom": SURFACE_SHIFT})
    print("held out:", ", ".join(frames[i].source for i in held))


if __name__ == "__main__":
    main()
