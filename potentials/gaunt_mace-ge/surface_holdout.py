"""Surfaces the model has not seen: hold 4 of the 11 training surface slabs of mlearn Ge out of training.

The validation split of ``datasets/mlearn_ge.h5`` (10 %, seed 0, the split every Ge card uses) holds no surface slab,
so validation errors say nothing about surface energies. This writes three files into OUT (default
``runs/surface_holdout``):

* ``ge_train_no4.h5``: the usual training split without 4 of its 11 surfaces (every second, from the first);
* ``ge_val.h5``: the usual validation split;
* ``ge_surfaces_held4.h5``: the 4 held-out surfaces.

Then, from the repository root (CPU, one thread, ~35 min each)::

    python potentials/gaunt_mace-ge/surface_holdout.py
    matkit train potentials/gaunt_mace-ge/surface_holdout.yaml
    matkit train potentials/gaunt_mace-ge/surface_holdout_w10.yaml
    matkit evaluate runs/surface_holdout/unweighted/best.pt runs/surface_holdout/ge_surfaces_held4.h5 --dtype float64

The results are in this potential's card ("Surfaces it has not seen").
"""
import argparse
from pathlib import Path

from matkit.data.dataset import random_split_indices
from matkit.data.hdf5 import FrameFile, HDF5Writer

DATA = "datasets/mlearn_ge.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/surface_holdout", help="output folder (default: %(default)s)")
    args = parser.parse_args()

    frames = FrameFile(DATA)
    train, val = random_split_indices(len(frames), 0.1, seed=0)      # the trainer's split for val_fraction 0.1, seed 0
    surfaces = [i for i in train if frames[i].group == "Surface"]
    held = surfaces[::2][:4]                 # the configs train on ge_train_no4.h5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"ge_train_no4.h5": [i for i in train if i not in held], "ge_val.h5": list(val),
             "ge_surfaces_held4.h5": held}
    for name, indices in files.items():
        with HDF5Writer(out / name, license="BSD-3-Clause",
                        provenance={"input": DATA, "frames": [int(i) for i in indices]}) as writer:
            for i in indices:
                writer.add(frames[i])
        print(f"{out / name}: {len(indices)} structures")
    print("held out:", ", ".join(frames[i].source for i in held))


if __name__ == "__main__":
    main()
