"""mlearn Mo with its molecular-dynamics frames split by temperature, so training can weigh or leave out each one.

mlearn files its three Mo NVT trajectories (300, 3000 and 6000 K; the temperature is in each frame's source string)
as one configuration type, AIMD-NVT. This writes two copies of ``datasets/mlearn_mo.h5`` into OUT (default
``runs/by_temperature``) with the same frames in the same order, so ``val_fraction: 0.1, seed: 0`` holds out the
same validation split as every Mo card:

* ``mo_by_temperature.h5``: AIMD-NVT renamed AIMD-300K, AIMD-3000K and AIMD-6000K;
* ``mo_6000k_halves.h5``: the same with every second 6000 K frame (in file order, from the second) in AIMD-6000K-b.

Then, from the repository root (CPU, one thread, 15-30 min each)::

    python potentials/tensornet-mo/by_temperature.py
    T=runs/by_temperature/mo_by_temperature.h5
    matkit train potentials/tensornet-mo/config.yaml data.train=$T "loss.config_type_weights={AIMD-6000K: 3.0}" \
        run.out_dir=runs/by_temperature/hot_x3
    matkit train potentials/tensornet-mo/config.yaml data.train=runs/by_temperature/mo_6000k_halves.h5 \
        "loss.config_type_weights={AIMD-6000K-b: 0.0}" run.out_dir=runs/by_temperature/half_hot
    matkit train examples/finetune/mo.yaml data.train=$T "loss.config_type_weights={AIMD-6000K: 0.0}" \
        optim.epochs=80 run.out_dir=runs/by_temperature/no_hot
    matkit train examples/finetune/mo.yaml data.train=$T optim.epochs=80 run.out_dir=runs/by_temperature/hot_only \
        "loss.config_type_weights={AIMD-300K: 0.0, AIMD-3000K: 0.0, Elastic: 0.0, Vacancy: 0.0, Surface: 0.0}"
    matkit evaluate runs/by_temperature/hot_x3/best.pt $T --split val --dtype float64 --per-group

The results are in tensornet-mo's card ("The 6000 K frames alone, without them, halved and weighted x3").
"""
import argparse
import dataclasses
import re
from collections import Counter
from pathlib import Path

from matkit.data.hdf5 import FrameFile, HDF5Writer

DATA = "datasets/mlearn_mo.h5"


def by_temperature(frame):
    """The frame with AIMD-NVT replaced by AIMD-<T>K, T read from its source ("... simulation at 6000 K")."""
    if frame.group != "AIMD-NVT":
        return frame
    kelvin = re.search(r"at (\d+) K", frame.source)
    if kelvin is None:
        raise ValueError(f"{DATA}: frame {frame.id!r}: no temperature in its source {frame.source!r}")
    return dataclasses.replace(frame, group=f"AIMD-{kelvin.group(1)}K")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/by_temperature", help="output folder (default: %(default)s)")
    args = parser.parse_args()

    data = FrameFile(DATA)
    frames = [by_temperature(data[i]) for i in range(len(data))]
    hot = [i for i, frame in enumerate(frames) if frame.group == "AIMD-6000K"]
    halves = list(frames)
    for i in hot[1::2]:
        halves[i] = dataclasses.replace(frames[i], group="AIMD-6000K-b")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, note in (("mo_by_temperature.h5", frames, "AIMD-NVT split by temperature"),
                             ("mo_6000k_halves.h5", halves, "and every second 6000 K frame in AIMD-6000K-b")):
        with HDF5Writer(out / name, license="BSD-3-Clause", provenance={"input": DATA, "note": note}) as writer:
            for frame in rows:
                writer.add(frame)
        print(f"{out / name}: {len(rows)} structures, {dict(Counter(frame.group for frame in rows))}")


if __name__ == "__main__":
    main()
