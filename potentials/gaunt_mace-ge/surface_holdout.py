"""Surfaces the model has not seen: hold 4 of the 11 training surface slabs of mlearn Ge out of training.

The validation split of ``datasets/mlearn_ge.h5`` (10 %, seed 0, the split every Ge card uses) holds no surface slab,
so validation errors say nothing about surface energies. This writes three files into OUT (default
``runs/surface_holdout``):

* ``ge_train_no4.h5``: the usual training split without 4 of its 11 surfaces (every second, from the first);
* ``ge_val.h5``: the usual validation split;
* ``ge_surfaces_held4.h5``: the 4 held-out surfaces.

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
    matkit evaluate runs/surface_holdout/unweighted/best.pt runs/surface_holdout/ge_surfaces_held4.h5 --dtype float64

The results are in the cards of gaunt_mace-ge ("Surfaces it has not seen") and tensornet-ge ("Surfaces it has not
seen, from scratch and fine-tuned").
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
    held = surfaces[::2][:4]
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
