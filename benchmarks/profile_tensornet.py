"""Where a TensorNet calculator call spends its time: stage by stage, then the heaviest torch operators.

Stages of one ``MatkitCalculator`` E+F call, in the order the calculator runs them, each timed on its own
(median CPU time of ``--repeats`` runs, 1 thread):

* ``neighbours fresh``: the cell-list build at the cutoff (what skin 0 pays every call);
* ``neighbours verlet``: the Verlet update at skin 0.5 Å after a 1e-4 Å move (reuse + filter to the cutoff);
* ``graph``: pair-distance check, precision-safe centring and the tensor graph;
* ``forward``: the energy (model graph with gradients enabled);
* ``backward``: the forces by autograd (forward + backward minus forward);
* ``call skin 0`` / ``call skin 0.5``: the whole calculator call, for comparison with the sum.

Then ``torch.profiler``'s table of the operators with the largest self CPU time over a few calls.

    PYTHONPATH=$PWD python benchmarks/profile_tensornet.py [--sizes 2,4] [--model-spec tensornet|matpes]

``--model-spec tensornet``: the torchmd-net comparison shape (128 channels, 2 layers, 32 expnorm, 5 Å, random
weights); ``matpes``: the bundled ``tensornet-matpes-pbe``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tensornet_speed_vs_torchmdnet import si  # noqa: E402

from matkit.calculator import DEFAULT_RADIAL_TABLE_KNOTS  # noqa: E402


def cpu_median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def build_model(spec: str):
    import matkit
    from matkit.checkpoint import load_checkpoint
    from matkit.potentials import checkpoint_path

    if spec == "matpes":
        return load_checkpoint(checkpoint_path("tensornet-matpes-pbe"))
    from model_specs import tensornet

    torch.manual_seed(0)
    return matkit.build(tensornet.MODEL, species=[1, 8, 14], **tensornet.ours_hparams())


def profile(n_cells: int, model, repeats: int, top: int, knots: int) -> None:
    from ase.calculators.calculator import all_changes

    from matkit.calculator import MatkitCalculator
    from matkit.graph import centred_positions, check_pair_distances, graph_from_pairs
    from matkit.neighbors import VerletNeighborList, neighbor_list

    atoms = si(n_cells)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.radial_table_knots = knots
    pos, cell, pbc, numbers = atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers
    i, j, S = neighbor_list(pos, cell, pbc, model.cutoff)
    verlet = VerletNeighborList(model.cutoff, 0.5)
    verlet.update(pos, cell, pbc)
    moved = [pos + 1e-4, pos - 1e-4]
    flip = [0]

    def verlet_update():
        flip[0] ^= 1
        verlet.update(moved[flip[0]], cell, pbc)

    def graph():
        check_pair_distances(pos, cell, i, j, S)
        p, s = centred_positions(pos, cell, pbc, S, i, j)
        return graph_from_pairs(p, numbers, cell, pbc, i, j, s, torch.float32, "cpu")

    g = graph()

    def forward():
        return model(g, forces=False)

    def forward_backward():
        return model(g, forces=True)

    rows = {"neighbours fresh": cpu_median(lambda: neighbor_list(pos, cell, pbc, model.cutoff), repeats),
            "neighbours verlet": cpu_median(verlet_update, repeats),
            "graph": cpu_median(graph, repeats)}
    with torch.enable_grad():
        rows["forward"] = cpu_median(forward, repeats)
        rows["backward"] = cpu_median(forward_backward, repeats) - rows["forward"]
    for skin in (0.0, 0.5):
        calc = MatkitCalculator(model, skin=skin, radial_table=knots)
        state = [1.0]

        def call():
            state[0] = -state[0]
            atoms.positions += state[0] * 1e-4
            calc.calculate(atoms, ["energy", "forces"], all_changes)

        rows[f"call skin {skin:g}"] = cpu_median(call, repeats)
    total = rows["call skin 0"]
    print(f"\nSi{len(atoms)}: {len(i)} directed pairs within {model.cutoff} Å, {model.__class__.__name__} "
          f"{sum(p.numel() for p in model.parameters())} parameters, float32, 1 thread, radial tables "
          f"{knots or 'off'}")
    print("| stage | CPU ms | share of a skin-0 call |\n|---|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {100 * seconds / total:.0f} % |")

    with torch.enable_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            forward_backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4", help="diamond Si supercells n x n x n of 8 atoms")
    parser.add_argument("--model-spec", choices=("tensornet", "matpes"), default="tensornet")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--radial-table", type=int, default=DEFAULT_RADIAL_TABLE_KNOTS,
                        help="knots of the radial tables (the calculator's float32 default); 0: exact MLPs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.model_spec)
    for n in (int(s) for s in args.sizes.split(",")):
        profile(n, model, args.repeats, args.top, args.radial_table)


if __name__ == "__main__":
    main()
