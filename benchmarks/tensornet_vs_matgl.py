"""Parity of the imported TensorNet-MatPES potentials with matgl 4.1.2 itself.

1. In matgl's own venv (``--peer-python``; this file runs there with ``--peer-stage`` and does not import
   matkit), ``matgl.load_model(<folder>)`` and ``matgl.ext.ase.PESCalculator(pot, stress_unit="eV/A3")``
   evaluate energy, forces and stress of every structure below, for each potential folder, in float32 (matgl's
   default) and in float64 (``torch.set_default_dtype(torch.float64)`` before loading, ``pot.double()``).
2. Here: the same structures through matkit's ``MatkitCalculator`` with the bundled potentials
   (``tensornet-matpes-pbe`` / ``-r2scan``, or the folder converted on the fly with ``--convert``), float32 and
   float64, and the largest differences per structure: energy per atom (eV/atom), forces (eV/Å, per component),
   stress (eV/Å^3, per Voigt component).

Structures (33): 24 MP-20 crystals from ``datasets/mp20_val.h5`` (1-20 atoms, picked greedily to cover as many
elements as possible, each rattled by 0.03 Å so that forces are not zero by symmetry), diamond Si64 rattled by
0.1 Å, a Cu(111) slab with vacuum, a rock-salt NaCl 2x2x2 supercell with a Na vacancy, SrTiO3 under a 5 %
triclinic strain, bcc Fe compressed to 80 % volume, an MgO(001) slab, an ethanol molecule in a 12 Å box, a lone Ge
atom in a 20 Å box (a graph without edges) and a Li atom 15 Å from an H2 molecule (a node without edges in a graph
with edges). All are periodic in three directions: matgl treats any non-periodic direction as a molecule without a
cell.

As an independent check of which convention is right (see :mod:`matkit.convert.matgl` on matgl's
``@model_version``), both sides' PBE force MAE against the DFT forces of the 21 MPtrj frames in
``datasets/mptrj_frames.h5`` is printed too.

    python benchmarks/tensornet_vs_matgl.py [--peer-python PY] [--matgl-dir DIR] [--json OUT]
    python benchmarks/tensornet_vs_matgl.py --fixture tests/fixtures/matgl/matpes_reference.npz

``--peer-python`` defaults to ``$MATKIT_MATGL_PYTHON``; create that venv with
``python -m venv peers/matgl && peers/matgl/bin/pip install torch==2.13.0 && peers/matgl/bin/pip install
--no-deps matgl==4.1.2 && peers/matgl/bin/pip install torch-geometric pymatgen ase lightning pydantic torchdata
boto3 huggingface_hub sympy``. ``--matgl-dir`` (the folder holding ``TensorNet-MatPES-*-v2025.1-PES/``) defaults to
``$MATKIT_MATGL_MODELS``, else ``../shared/data/matgl_tensornet_matpes`` next to the repository. ``--fixture``
writes the structures and matgl's outputs (float32 and float64) as a NumPy ``.npz`` (no pickles) for
``tests/test_matgl_import.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tensornet-matpes-pbe": "TensorNet-MatPES-PBE-v2025.1-PES",
          "tensornet-matpes-r2scan": "TensorNet-MatPES-r2SCAN-v2025.1-PES"}


def default_matgl_dir() -> Path:
    return Path(os.environ.get("MATKIT_MATGL_MODELS", ROOT.parent / "shared" / "data" / "matgl_tensornet_matpes"))


def structures(supported) -> list:
    """[(name, numbers, positions, cell, pbc)] as plain lists (see the module docstring)."""
    import numpy as np
    from ase import Atoms
    from ase.build import bulk, fcc111, molecule, surface

    from matkit.data.hdf5 import FrameFile
    from matkit.demo import perovskite

    out = []
    frames = [f for f in FrameFile(ROOT / "datasets" / "mp20_val.h5")
              if f.n_atoms <= 20 and set(f.atomic_numbers.tolist()) <= set(supported)]
    covered, rng = set(), np.random.default_rng(7)
    for _ in range(24):  # greedy: the crystal adding most new elements, ties broken by file order
        best = frames.pop(max(range(len(frames)),
                              key=lambda k: (len(set(frames[k].atomic_numbers.tolist()) - covered), -k)))
        covered |= set(best.atomic_numbers.tolist())
        atoms = best.to_atoms()
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        out.append((best.id, atoms))

    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    si.rattle(0.1, seed=1)
    out.append(("Si64-rattled", si))
    slab = fcc111("Cu", size=(2, 2, 4), vacuum=7.0, periodic=True)
    slab.rattle(0.05, seed=2)
    out.append(("Cu111-slab", slab))
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    del nacl[0]
    nacl.rattle(0.03, seed=3)
    out.append(("NaCl-vacancy", nacl))
    sto = perovskite("SrTiO3", 3.905)
    sto.set_cell(sto.cell.array @ (np.eye(3) + [[0.05, 0.03, 0.0], [0.0, -0.02, 0.04], [0.01, 0.0, 0.03]]),
                 scale_atoms=True)
    sto.rattle(0.02, seed=4)
    out.append(("SrTiO3-strained", sto))
    fe = bulk("Fe", "bcc", a=2.87 * 0.8 ** (1 / 3), cubic=True).repeat((2, 2, 2))
    fe.rattle(0.03, seed=5)
    out.append(("Fe-compressed", fe))
    mgo = surface(bulk("MgO", "rocksalt", a=4.21), (0, 0, 1), 3, vacuum=6.0, periodic=True)
    mgo.rattle(0.03, seed=6)
    out.append(("MgO001-slab", mgo))
    ethanol = molecule("CH3CH2OH")
    ethanol.set_cell([12.0, 12.0, 12.0])
    ethanol.center()
    ethanol.pbc = True
    out.append(("ethanol-in-box", ethanol))
    # atoms with no neighbour within the cutoff: a graph without edges, and one such atom beside a bonded pair
    out.append(("Ge-atom-in-box", Atoms("Ge", positions=[[0.0, 0.0, 0.0]], cell=[20.0, 20.0, 20.0], pbc=True)))
    out.append(("Li-atom-beside-H2", Atoms("LiH2", positions=[[2.0, 2.0, 2.0], [11.0, 11.0, 11.0], [11.74, 11.0, 11.0]],
                                           cell=[20.0, 20.0, 20.0], pbc=True)))
    return [(name, a.numbers.tolist(), a.positions.tolist(), a.cell.array.tolist(), a.pbc.tolist())
            for name, a in out]


# ---------------------------------------------------------------------------------------------------------------
# stage 1: inside matgl's venv (no matkit import)
# ---------------------------------------------------------------------------------------------------------------
def peer_stage(workdir: Path) -> None:
    import numpy as np
    import torch
    from ase import Atoms

    import matgl
    from matgl.ext.ase import PESCalculator

    spec = json.loads((workdir / "spec.json").read_text())
    torch.set_num_threads(1)
    results = {"matgl_version": matgl.__version__}
    for precision in ("float32", "float64"):
        matgl.set_default_dtype("float", 64 if precision == "float64" else 32)   # also torch's default dtype
        for name, folder in spec["models"].items():
            pot = matgl.load_model(folder)
            if precision == "float64":
                pot = pot.double()
            calc = PESCalculator(pot, stress_unit="eV/A3", use_voigt=True)
            for sname, numbers, positions, cell, pbc in spec["structures"]:
                atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
                atoms.calc = calc
                results[f"{name}/{precision}/{sname}"] = {
                    "energy": float(atoms.get_potential_energy()),
                    "forces": np.asarray(atoms.get_forces(), dtype=float).tolist(),
                    "stress": np.asarray(atoms.get_stress(), dtype=float).tolist()}
            if precision == "float32" and name == "tensornet-matpes-pbe":
                results["dft_force_mae"] = dft_force_mae(calc, spec["dft_frames"])
    (workdir / "reference.json").write_text(json.dumps(results))


def dft_frames() -> list:
    """[(numbers, positions, cell, forces)] of the MPtrj frames in ``datasets/mptrj_frames.h5`` (3-5 elements each)."""
    from matkit.data.hdf5 import FrameFile

    return [(f.atomic_numbers.tolist(), f.positions.tolist(), f.cell.tolist(), f.forces.tolist())
            for f in FrameFile(ROOT / "datasets" / "mptrj_frames.h5")]


def dft_force_mae(calc, frames) -> float:
    """Force MAE (eV/Å, per component) of ``calc`` against the DFT forces of ``frames``."""
    import numpy as np
    from ase import Atoms

    errors = [np.zeros(0)]
    for numbers, positions, cell, forces in frames:
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
        atoms.calc = calc
        errors.append(np.abs(atoms.get_forces() - np.asarray(forces)).ravel())
    errors = np.concatenate(errors)
    return float(errors.mean()) if errors.size else float("nan")


def run_peer(peer_python: str, workdir: Path, spec: dict) -> dict:
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([peer_python, __file__, "--peer-stage", str(workdir)], check=True, env=env)
    return json.loads((workdir / "reference.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# stage 2: matkit side
# ---------------------------------------------------------------------------------------------------------------
def matkit_calculator(name: str, precision: str, matgl_dir: Path, convert: bool):
    import torch

    from matkit.calculator import MatkitCalculator
    from matkit.convert.matgl import load_matgl_tensornet

    if convert:
        return MatkitCalculator(load_matgl_tensornet(matgl_dir / MODELS[name], dtype=torch.float64), dtype=precision)
    return MatkitCalculator.from_pretrained(name, dtype=precision)


def differences(calc, structs, reference, key) -> dict:
    """{structure: (max |dE|/atom, max |dF|, max |dS|)} of ``calc`` against ``reference[key/structure]``."""
    import numpy as np
    from ase import Atoms

    rows = {}
    for sname, numbers, positions, cell, pbc in structs:
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        atoms.calc = calc
        ref = reference[f"{key}/{sname}"]
        rows[sname] = (abs(atoms.get_potential_energy() - ref["energy"]) / len(atoms),
                       float(np.abs(atoms.get_forces() - np.asarray(ref["forces"])).max()),
                       float(np.abs(atoms.get_stress() - np.asarray(ref["stress"])).max()))
    return rows


def write_fixture(path: Path, structs, reference) -> None:
    import numpy as np

    arrays = {"structure_names": np.array([s[0] for s in structs]),
              "matgl_version": np.array(reference["matgl_version"])}
    for sname, numbers, positions, cell, pbc in structs:
        arrays[f"{sname}/numbers"] = np.asarray(numbers, dtype=np.int64)
        arrays[f"{sname}/positions"] = np.asarray(positions, dtype=np.float64)
        arrays[f"{sname}/cell"] = np.asarray(cell, dtype=np.float64)
        arrays[f"{sname}/pbc"] = np.asarray(pbc, dtype=bool)
    for key, value in reference.items():
        if not isinstance(value, dict):
            continue
        for quantity in ("energy", "forces", "stress"):
            arrays[f"{key}/{quantity}"] = np.asarray(value[quantity], dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-stage", help=argparse.SUPPRESS)
    parser.add_argument("--peer-python", default=os.environ.get("MATKIT_MATGL_PYTHON"),
                        help="python of matgl's venv (default $MATKIT_MATGL_PYTHON)")
    parser.add_argument("--matgl-dir", type=Path, default=None,
                        help="folder with the matgl TensorNet-MatPES folders (default $MATKIT_MATGL_MODELS, else "
                             "../shared/data/matgl_tensornet_matpes)")
    parser.add_argument("--convert", action="store_true",
                        help="convert the matgl folders now instead of loading the bundled potentials")
    parser.add_argument("--fixture", type=Path, help="also write the structures and matgl's outputs here (.npz)")
    parser.add_argument("--json", type=Path, help="write the per-structure differences here")
    args = parser.parse_args(argv)
    if args.peer_stage:
        peer_stage(Path(args.peer_stage))
        return 0
    if not args.peer_python:
        parser.error("give matgl's python with --peer-python or $MATKIT_MATGL_PYTHON")
    matgl_dir = args.matgl_dir or default_matgl_dir()
    sys.path.insert(0, str(ROOT))
    from matkit.convert.matgl import read_matgl_potential

    config, _ = read_matgl_potential(matgl_dir / MODELS["tensornet-matpes-pbe"])
    from ase.data import atomic_numbers

    supported = [atomic_numbers[e] for e in config["kwargs"]["model"]["init_args"]["element_types"]]
    structs = structures(supported)
    spec = {"models": {name: str(matgl_dir / folder) for name, folder in MODELS.items()}, "structures": structs,
            "dft_frames": dft_frames()}
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_peer(args.peer_python, Path(tmp), spec)
    if args.fixture:
        write_fixture(args.fixture, structs, reference)

    report = {}
    elements = sorted({z for s in structs for z in s[1]})
    print(f"matkit vs matgl {reference['matgl_version']}: {len(structs)} structures, "
          f"{sum(len(s[1]) for s in structs)} atoms, {len(elements)} elements")
    print("| potential | precision | max dE (eV/atom) | max dF (eV/Å) | max dS (eV/Å^3) | worst structure (F) |")
    print("|---|---|---:|---:|---:|---|")
    for name in MODELS:
        for precision in ("float32", "float64"):
            calc = matkit_calculator(name, precision, matgl_dir, args.convert)
            rows = differences(calc, structs, reference, f"{name}/{precision}")
            report[f"{name}/{precision}"] = rows
            worst = [max(r[k] for r in rows.values()) for k in range(3)]
            worst_f = max(rows, key=lambda s: rows[s][1])
            print(f"| {name} | {precision} | {worst[0]:.1e} | {worst[1]:.1e} | {worst[2]:.1e} | {worst_f} |")
    ours = dft_force_mae(matkit_calculator("tensornet-matpes-pbe", "float32", matgl_dir, args.convert),
                         spec["dft_frames"])
    print(f"tensornet-matpes-pbe force MAE against the DFT forces of datasets/mptrj_frames.h5 "
          f"({len(spec['dft_frames'])} MPtrj frames, 3-5 elements each; float32): "
          f"matgl {reference['matgl_version']} {reference['dft_force_mae']:.4f} eV/Å, matkit {ours:.4f} eV/Å")
    report["dft_force_mae"] = {"matgl": reference["dft_force_mae"], "matkit": ours,
                               "matgl_version": reference["matgl_version"]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
