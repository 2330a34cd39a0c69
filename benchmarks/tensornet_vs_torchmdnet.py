"""Numerical equivalence of matkit's TensorNet with torchmd-net 3.1.0's TensorNet on converted weights.

1. In the torchmd-net venv (``--peer-python``, a subprocess; this file is run there with ``--peer-stage``
   and must not import matkit): build a random ``TorchMD_Net(TensorNet, Scalar)`` with ``create_model``,
   perturb its LayerNorm / bias parameters and its ``std`` so that every mapped tensor matters, save it as a
   torchmd-net checkpoint, and evaluate energies and forces (``derivative=True``) on
   * Si64: 2x2x2 cubic diamond Si, rattled (periodic);
   * SiCO64: the same with 4 C and 4 O substitutions (periodic, several species);
   * ethanol (non-periodic).
   torchmd-net's periodic neighbour list is minimum-image, so the 10.9 Å boxes keep the cutoff below half the
   box. Evaluation is in float64 (torchmd-net's warp kernels support it; ``precision=64``), in float32, and in
   float64 with torchmd-net's pure-PyTorch fallback ops (its warp and pure-PyTorch paths differ by ~4e-9
   relative in float64 themselves).
2. Here: convert the checkpoint with :func:`matkit.convert.torchmdnet.load_torchmdnet_tensornet`, evaluate
   the same structures and report the relative differences (energy: |dE|/|E|; forces: max|dF|/max|F|).

Usage::

    PYTHONPATH=$PWD python benchmarks/tensornet_vs_torchmdnet.py                 # defaults: 128 ch, 2 layers, 5 Å
    PYTHONPATH=$PWD python benchmarks/tensornet_vs_torchmdnet.py --small --fixture tests/data/tensornet_torchmdnet.pt

``--fixture`` writes the small model's torchmd-net state dict + the reference energies/forces (float64, torchmd-net
pure-PyTorch ops) as plain
tensors (``torch.load(weights_only=True)``) for ``tests/test_tensornet.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PEER_PYTHON = os.environ.get("MATKIT_TMD_PYTHON")  # torchmd-net venv (see benchmarks/model_specs/README.md)
SPECIES = [1, 6, 8, 14]


def structures():
    """[(name, numbers, positions, cell, pbc)] as plain lists."""
    import numpy as np
    from ase.build import bulk, molecule

    out = []
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    si.rattle(0.1, seed=1)
    out.append(("Si64", si))
    mixed = si.copy()
    rng = np.random.default_rng(2)
    picks = rng.choice(len(mixed), 8, replace=False)
    mixed.numbers[picks[:4]] = 6
    mixed.numbers[picks[4:]] = 8
    mixed.rattle(0.05, seed=3)
    out.append(("SiCO64", mixed))
    out.append(("ethanol", molecule("CH3CH2OH")))
    return [(name, a.numbers.tolist(), a.positions.tolist(), a.cell.array.tolist(), a.pbc.tolist())
            for name, a in out]


def peer_args(channels, layers, rbf, cutoff, group, precision, max_z=128):
    return dict(model="tensornet", embedding_dimension=channels, num_layers=layers, num_rbf=rbf,
                rbf_type="expnorm", trainable_rbf=False, activation="silu", cutoff_lower=0.0,
                cutoff_upper=cutoff, max_z=max_z, max_num_neighbors=64, equivariance_invariance_group=group,
                static_shapes=False, precision=precision, derivative=True, atom_filter=-1, prior_model=None,
                output_model="Scalar", reduce_op="sum", output_mlp_num_layers=0)


# ---------------------------------------------------------------------------------------------------------------
# stage 1: inside the torchmd-net venv
# ---------------------------------------------------------------------------------------------------------------
def use_pure_torch_ops() -> None:
    """Switch torchmd-net's TensorNet from its warp kernels to its pure-PyTorch ops (as without warp-lang)."""
    import torchmdnet.models.tensornet as tn

    tn.OPT = False
    for name in ("compose_tensor", "decompose_tensor", "tensor_matmul_o3", "tensor_matmul_so3"):
        setattr(tn, name, getattr(tn, "_" + name))


def peer_stage(workdir: Path, spec: dict) -> None:
    import torch
    from torchmdnet.models.model import create_model

    torch.manual_seed(spec["seed"])
    args = peer_args(spec["channels"], spec["layers"], spec["rbf"], spec["cutoff"], spec["group"], 64, spec["max_z"])
    model = create_model(dict(args))
    with torch.no_grad():  # make LayerNorm affine parameters, output biases and std non-trivial
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("output_model") and name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
        model.std.fill_(1.7)
    state = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": args, "state_dict": state}, workdir / "model.ckpt")

    results = {}
    for precision, dtype in ((64, torch.float64), (32, torch.float32), ("64-puretorch", torch.float64)):
        if precision == "64-puretorch":
            use_pure_torch_ops()
        m = create_model(dict(args, precision=64 if precision == "64-puretorch" else precision))
        m.load_state_dict({k[len("model."):]: v for k, v in state.items()})
        m = m.to(dtype).eval()
        for name, numbers, positions, cell, pbc in spec["structures"]:
            z = torch.tensor(numbers, dtype=torch.long)
            pos = torch.tensor(positions, dtype=dtype)
            box = torch.tensor(cell, dtype=dtype) if any(pbc) else None
            energy, neg_dy = m(z, pos, batch=torch.zeros_like(z), box=box)
            results[f"{name}/{precision}"] = {"energy": energy.detach().double().reshape(()),
                                              "forces": neg_dy.detach().double()}
    torch.save(results, workdir / "reference.pt")


# ---------------------------------------------------------------------------------------------------------------
# stage 2: matkit side
# ---------------------------------------------------------------------------------------------------------------
def run_peer(peer_python: str, workdir: Path, spec: dict) -> None:
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([peer_python, __file__, "--peer-stage", str(workdir)], check=True, env=env)


def compare(workdir: Path, spec: dict, fixture: Path | None = None) -> dict:
    import numpy as np
    import torch
    from ase import Atoms

    from matkit.convert.torchmdnet import load_torchmdnet_tensornet, read_torchmdnet_checkpoint
    from matkit.graph import atoms_to_graph

    reference = torch.load(workdir / "reference.pt", weights_only=True)
    report = {}
    for precision, dtype in ((64, torch.float64), (32, torch.float32), ("64-puretorch", torch.float64)):
        model = load_torchmdnet_tensornet(workdir / "model.ckpt", species=SPECIES, dtype=dtype).eval()
        for name, numbers, positions, cell, pbc in spec["structures"]:
            atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
            out = model(atoms_to_graph(atoms, model.cutoff, dtype=dtype), forces=True)
            ref = reference[f"{name}/{precision}"]
            e_ref, f_ref = float(ref["energy"]), ref["forces"].numpy()
            e, f = float(out["energy"][0].detach()), out["forces"].detach().double().numpy()
            report[f"{name}/float{precision}"] = {
                "energy_torchmdnet": e_ref, "energy_matkit": e,
                "energy_rel_diff": abs(e - e_ref) / max(abs(e_ref), 1e-12),
                "forces_rel_diff": float(np.abs(f - f_ref).max() / max(np.abs(f_ref).max(), 1e-12)),
                "max_force": float(np.abs(f_ref).max()),
            }
    if fixture is not None:
        ckpt = read_torchmdnet_checkpoint(workdir / "model.ckpt")
        data = {"hyper_parameters": ckpt["hyper_parameters"], "state_dict": ckpt["state_dict"],
                "species": SPECIES,
                "structures": [{"name": n, "numbers": torch.tensor(z),
                                "positions": torch.tensor(p, dtype=torch.float64),
                                "cell": torch.tensor(c, dtype=torch.float64), "pbc": torch.tensor(b)}
                               for n, z, p, c, b in spec["structures"]],
                "energy": {n: reference[f"{n}/64-puretorch"]["energy"] for n, *_ in spec["structures"]},
                "forces": {n: reference[f"{n}/64-puretorch"]["forces"] for n, *_ in spec["structures"]}}
        fixture.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, fixture)
        print(f"wrote {fixture} ({fixture.stat().st_size / 1024:.1f} KiB)")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-stage", help=argparse.SUPPRESS)
    parser.add_argument("--peer-python", default=PEER_PYTHON,
                        help="python of the torchmd-net venv (default $MATKIT_TMD_PYTHON)")
    parser.add_argument("--small", action="store_true",
                        help="8 channels, 6 rbf, 4.5 Å, max_z 16 (the test fixture model)")
    parser.add_argument("--group", default="O(3)", choices=["O(3)", "SO(3)"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixture", type=Path, help="write a small test fixture here")
    args = parser.parse_args(argv)
    if args.peer_stage:
        workdir = Path(args.peer_stage)
        peer_stage(workdir, json.loads((workdir / "spec.json").read_text()))
        return
    if not args.peer_python:
        parser.error("give torchmd-net's python with --peer-python or $MATKIT_TMD_PYTHON")
    channels, rbf, cutoff, max_z = (8, 6, 4.5, 16) if args.small else (128, 32, 5.0, 128)
    spec = dict(channels=channels, layers=2, rbf=rbf, cutoff=cutoff, group=args.group, seed=args.seed, max_z=max_z,
                structures=structures())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run_peer(args.peer_python, workdir, spec)
        report = compare(workdir, spec, args.fixture)
    print(f"TensorNet {channels} channels, 2 layers, {rbf} rbf, cutoff {cutoff} Å, {args.group}")
    print(f"{'structure/precision':24s} {'E torchmd-net':>16s} {'E matkit':>16s} {'|dE|/|E|':>10s} "
          f"{'max|dF|/max|F|':>15s}")
    for key, r in report.items():
        print(f"{key:24s} {r['energy_torchmdnet']:16.8f} {r['energy_matkit']:16.8f} {r['energy_rel_diff']:10.2e} "
              f"{r['forces_rel_diff']:15.2e}")
    for tag in ("float64", "float64-puretorch", "float32"):
        rows = [r for k, r in report.items() if k.endswith("/" + tag)]
        worst = max(max(r["energy_rel_diff"], r["forces_rel_diff"]) for r in rows)
        print(f"worst relative difference vs torchmd-net {tag:18s}: {worst:.2e}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
