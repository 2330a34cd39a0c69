"""Neighbour-list benchmark: matkit (Numba cell list) vs vesin (1 thread) and matscipy, measured in one run.

    python benchmarks/neighbors.py [--quick] [--json out.json]

Every library computes the same full ``ijS`` list (pair counts are checked to agree). Per system the libraries are
timed *interleaved* (one call of each in turn, repeated until a time budget is used), so slow drifts of a shared machine
hit all of them alike. The tables show the median *CPU time* per call (all libraries compute in the calling thread, so
this is their own work and does not count time the process spent descheduled on a busy machine) and the ratios to
matkit; the last column is the same ratio from wall-clock medians. All libraries run on one thread (OMP/NUMBA threads
= 1, vesin ``n_threads=1``). matkit's time includes sorting the list by (i, j, S) and the
borderline re-test; vesin's list is unsorted. The first-call (JIT compile) time of matkit is measured in fresh
subprocesses with an empty Numba cache.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

from matkit.neighbors import batched_neighbor_list, neighbor_list  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

_COMPILE_PROBE = """
import time, numpy as np
t0 = time.perf_counter()
from matkit.neighbors import neighbor_list, batched_neighbor_list, VerletNeighborList
t1, c1 = time.perf_counter(), time.process_time()
pos = np.array([[0.0, 0.0, 0.0], [1.0, 1.1, 0.9]]); cell = np.eye(3) * 3.0
neighbor_list(pos, cell, [True, True, True], 2.5)
batched_neighbor_list(pos, cell[None], [True, False, True], np.array([0, 2]), 2.5)
VerletNeighborList(2.0, 0.5).update(pos, cell, [True, True, True])
print(t1 - t0, time.perf_counter() - t1, time.process_time() - c1)
"""


def compile_time() -> dict:
    """First-call cost of the Numba kernels, measured in fresh Python processes.

    Returns ``{"compile_s": s, "compile_cpu_s": s, "cached_s": s, "import_s": s}``: wall and CPU time of the first
    calls of ``neighbor_list``, ``batched_neighbor_list`` and ``VerletNeighborList.update`` with an empty Numba cache
    (full JIT compilation), then the wall time of the same calls in a second process that loads the kernels from that
    cache (``cache=True``), and the import time of the module (with the matkit package).
    """
    repo = str(ROOT)
    with tempfile.TemporaryDirectory() as cache_dir:
        python_path = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=python_path)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True, text=True,
                                 check=True)
            runs.append([float(x) for x in out.stdout.split()])
    return {"compile_s": runs[0][1], "compile_cpu_s": runs[0][2], "cached_s": runs[1][1], "import_s": runs[1][0]}


TRICLINIC_CELL = np.array([[2.9, 0.0, 0.0], [0.9, 2.7, 0.0], [0.6, 0.8, 3.1]])


def systems(quick: bool):
    """(name, positions (n,3) Å, cell (3,3) Å, pbc (3,)) of the benchmark systems."""
    out = []
    for rep in (3, 6, 10) if quick else (3, 6, 10, 20):
        atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(rep)
        out.append((f"fcc_Cu_{len(atoms)}", atoms.positions, atoms.cell.array, (True, True, True)))
    if not quick:  # same crystal with the atom order shuffled (no spatial order to exploit)
        order = np.random.default_rng(0).permutation(len(atoms))
        out.append((f"fcc_Cu_{len(atoms)}_shuffled", atoms.positions[order], atoms.cell.array, (True, True, True)))
    cluster = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(6)
    out.append(("Cu864_cluster_nonpbc", cluster.positions, np.zeros((3, 3)), (False, False, False)))
    two = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]) @ TRICLINIC_CELL
    out.append(("triclinic_2atom", two, TRICLINIC_CELL, (True, True, True)))
    c60 = molecule("C60")
    c60.center(vacuum=6.0)  # a box for matscipy; open boundaries for everybody
    out.append(("C60_molecule_nonpbc", c60.positions, c60.cell.array, (False, False, False)))
    return out


def make_runners(positions, cell, pbc, cutoff):
    """name -> zero-argument callable returning (i, j, S) for every installed library."""
    runners = {"matkit": lambda: neighbor_list(positions, cell, pbc, cutoff)}
    box = cell
    if not any(pbc) and not np.any(cell):  # matscipy wants a box around an open system
        box = np.diag(np.ptp(positions, axis=0) + 2 * cutoff)
        positions = positions - positions.min(axis=0) + cutoff
    try:
        import vesin

        nl = vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=1)
        runners["vesin(1)"] = lambda: nl.compute(positions, cell, list(pbc), "ijS")
    except ImportError:
        pass
    try:
        from matscipy.neighbours import neighbour_list

        runners["matscipy"] = lambda: neighbour_list("ijS", positions=positions, cell=box, pbc=np.array(pbc),
                                                     cutoff=cutoff)
    except ImportError:
        pass
    return runners


def time_interleaved(runners, budget_s: float, min_repeats: int = 5):
    """Median seconds per call of each runner, timing one call of each in turn until ``budget_s`` is used.

    Every sample records the process CPU time, split into user and system time (``getrusage``; system time is
    mostly first-touch page faults of the output arrays), and the wall time (``time.perf_counter``). All libraries
    run in the calling thread, so CPU time is their work alone and is robust against the machine being shared (time
    spent descheduled does not count). Calls shorter than ~1 ms are timed in groups (the group's mean is one sample).
    Returns ({name: {"cpu": s, "user": s, "sys": s, "wall": s}} of medians, {name: n_samples}).
    """
    group = {}
    for name, fn in runners.items():
        fn()  # warm-up (and JIT) outside the timing
        t0 = time.perf_counter()
        fn()
        group[name] = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: {"cpu": [], "user": [], "sys": [], "wall": []} for name in runners}
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or min(len(s["cpu"]) for s in samples.values()) < min_repeats:
        for name, fn in runners.items():
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(group[name]):
                fn()
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            for key, value in (("cpu", user + system), ("user", user), ("sys", system), ("wall", w1 - w0)):
                samples[name][key].append(value / group[name])
    medians = {name: {key: float(np.median(v)) for key, v in d.items()} for name, d in samples.items()}
    return medians, {name: len(d["cpu"]) for name, d in samples.items()}


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def batched_case(n_structures: int, cutoff: float, seed: int = 0):
    """Matbench-like batch: random cells of 2-16 atoms (8 on average), ~12 Å^3 per atom, random pbc mostly True."""
    rng = np.random.default_rng(seed)
    positions, cells = [], []
    for _ in range(n_structures):
        n = int(rng.integers(2, 15))
        cell = np.diag(rng.uniform(0.8, 1.2, 3)) + rng.uniform(-0.3, 0.3, (3, 3))
        cell *= (12.0 * n / abs(np.linalg.det(cell))) ** (1 / 3)
        cells.append(cell)
        positions.append(rng.random((n, 3)) @ cell)
    return positions, np.stack(cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip 32000 atoms, shorter budgets")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per system (default 2, quick 0.5)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)

    import numba

    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    for mod in ("vesin", "matscipy", "ase"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    print("versions:", versions)
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, loadavg {os.getloadavg()}")

    ct = compile_time()
    print(f"matkit first call: {ct['compile_s']:.1f} s wall / {ct['compile_cpu_s']:.1f} s CPU with an empty Numba "
          f"cache (JIT compile), {ct['cached_s']:.2f} s from the cache (cache=True); import {ct['import_s']:.1f} s\n")

    results = []
    for cutoff in (5.0, 6.0):
        print(f"cutoff {cutoff} Å: median CPU time per call (wall-time ratio vesin/matkit in the last column)")
        header = f"{'system':26s} {'N':>6s} {'pairs':>8s} {'matkit':>10s} {'vesin(1)':>10s} {'matscipy':>10s} " \
                 f"{'vesin/matkit':>12s} {'matscipy/matkit':>15s} {'matkit ns/pair':>14s} {'wall v/m':>8s}"
        print(header)
        for name, positions, cell, pbc in systems(args.quick):
            runners = make_runners(positions, cell, pbc, cutoff)
            counts = {lib: len(fn()[0]) for lib, fn in runners.items()}
            if len(set(counts.values())) != 1:
                raise RuntimeError(f"pair counts differ on {name}: {counts}")
            pairs = counts["matkit"]
            budget_here = budget * (5 if len(positions) >= 32000 else 1)
            both, n_samples = time_interleaved(runners, budget_here)
            t = {lib: v["cpu"] for lib, v in both.items()}
            wall = {lib: v["wall"] for lib, v in both.items()}
            row = dict(system=name, n_atoms=len(positions), cutoff=cutoff, pairs=pairs, seconds=t, wall_seconds=wall,
                       user_seconds={lib: v["user"] for lib, v in both.items()},
                       sys_seconds={lib: v["sys"] for lib, v in both.items()}, samples=n_samples)
            results.append(row)
            ratio = {lib: t[lib] / t["matkit"] for lib in t}
            wall_ratio = wall.get("vesin(1)", np.nan) / wall["matkit"]
            print(f"{name:26s} {len(positions):6d} {pairs:8d} {fmt_time(t['matkit']):>10s} "
                  f"{fmt_time(t.get('vesin(1)', np.nan)):>10s} {fmt_time(t.get('matscipy', np.nan)):>10s} "
                  f"{ratio.get('vesin(1)', np.nan):12.2f} {ratio.get('matscipy', np.nan):15.2f} "
                  f"{t['matkit'] / max(pairs, 1) * 1e9:14.0f} {wall_ratio:8.2f}")
        print()

    print("user / system CPU time (median ms) at 32000 atoms; system time = page faults of fresh output memory")
    for r in results:
        if r["n_atoms"] >= 32000:
            print(f"  {r['system']:24s} rc={r['cutoff']}  " + "  ".join(
                f"{lib} {r['user_seconds'][lib] * 1e3:.0f}/{r['sys_seconds'][lib] * 1e3:.0f}" for lib in r["seconds"]))
    fcc = [r for r in results if r["system"].startswith("fcc_Cu") and r["n_atoms"] >= 864
           and not r["system"].endswith("shuffled")]
    print("scaling (fcc Cu, N >= 864, CPU time): exponent b of t ~ N^b, and ns per directed pair at the largest N")
    for cutoff in (5.0, 6.0):
        rows = [r for r in fcc if r["cutoff"] == cutoff]
        for lib in rows[0]["seconds"]:
            n = np.array([r["n_atoms"] for r in rows], float)
            tt = np.array([r["seconds"][lib] for r in rows])
            b = np.polyfit(np.log(n), np.log(tt), 1)[0]
            big = rows[-1]
            print(f"  rc={cutoff} {lib:10s} b={b:.2f}  {big['seconds'][lib] / big['pairs'] * 1e9:.0f} ns/pair "
                  f"at N={big['n_atoms']}")

    # many small structures in one call
    positions, cells = batched_case(1000 if not args.quick else 300, 5.0)
    pbc = np.ones(3, bool)
    runners = {
        "matkit batched": lambda: batched_neighbor_list(positions, cells, pbc, cutoff=5.0),
        "matkit loop": lambda: [neighbor_list(p, c, pbc, 5.0) for p, c in zip(positions, cells)],
    }
    try:
        import vesin

        nl = vesin.NeighborList(cutoff=5.0, full_list=True, n_threads=1)
        runners["vesin(1) loop"] = lambda: [nl.compute(p, c, True, "ijS") for p, c in zip(positions, cells)]
    except ImportError:
        pass
    both, _ = time_interleaved(runners, budget)
    t = {lib: v["cpu"] for lib, v in both.items()}
    n_atoms = sum(len(p) for p in positions)
    pairs = len(batched_neighbor_list(positions, cells, pbc, cutoff=5.0)[0])
    print(f"\n(CPU time) {len(positions)} small periodic structures ({n_atoms / len(positions):.1f} atoms each, "
          f"{pairs} pairs, rc 5 Å), one call per batch:")
    for lib, s in t.items():
        print(f"  {lib:16s} {fmt_time(s):>10s}  ({s / len(positions) * 1e6:.1f} µs per structure)")
    results.append(dict(system="batch_small_structures", n_structures=len(positions), n_atoms=n_atoms, cutoff=5.0,
                        pairs=pairs, seconds=t, wall_seconds={lib: v["wall"] for lib, v in both.items()}))
    print(f"\nloadavg at end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(versions=versions, compile=ct, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
