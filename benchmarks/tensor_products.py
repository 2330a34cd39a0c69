"""Gaunt tensor product (grid and Fourier routes) against e3nn's Clebsch-Gordan tensor product, in one run.

The operation is MACE's channel-wise ("uvu") product of node features with an edge attribute, all degrees
0..L in, 0..L out:

    x1 (E, C, (L+1)^2)  (x)  x2 (E, 1, (L+1)^2)  ->  (E, C, (L+1)^2)

* ``grid``: :class:`matkit.nn.gaunt.GauntTensorProduct` with ``method="grid"``.
* ``fourier``: the same module with ``method="fourier"``; for every L both backends ("dft", "fft") are timed
  on a slice of the edges and the faster one is measured (the table names it).
* ``e3nn``: ``e3nn.o3.TensorProduct`` with one "uvu" instruction for every parity-allowed path
  (l1, l2) -> l3 <= L (these are exactly the paths whose Gaunt coefficient is non-zero), shared internal
  weights (one per path and channel), inputs in e3nn's irreps layout ``x1 (E, C*(L+1)^2)``, ``x2 (E, (L+1)^2)``.
  Normalisations are switched off and the weights set to the Gaunt path weights, so before timing the
  benchmark checks that e3nn and matkit compute the same numbers (``check`` column: max relative difference).
  The weights are fixed (``requires_grad=False``): forward+backward computes the gradients of x1 and x2 on
  every side, nothing else.

Reported per (method, L): median wall time of the forward pass (under ``torch.no_grad``) and of forward+backward
(``out.backward(g)`` with a fixed random ``g``), over ``--repeats`` calls after a warm-up (fewer if a case would
exceed ``--budget`` seconds; at least 3 unless ``--repeats`` is smaller), and peak extra memory of one
forward+backward call. Memory, CPU: each case runs in its own subprocess; freed heap pages are returned to the
kernel (glibc ``malloc_trim``) and its peak-RSS counter is reset (``/proc/self/clear_refs``) right before the
call, and the reading is ``VmHWM - VmRSS`` at that point, i.e. what the call added on top of inputs and modules
(falls back to ``ru_maxrss`` deltas where clear_refs is unavailable: then marked ``~``). CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the call.
If e3nn's forward+backward at E edges is predicted to take more than ``--max-call-seconds`` it is measured on
fewer edges and times and memory are scaled linearly in E (marked ``*``). The exponent p of time ~ L^p is the
least-squares slope of log(time) against log(L) over L = 2..8 (the measured part of it).

    python benchmarks/tensor_products.py                                   # L = 1..8, 10,000 edges, 8 channels
    python benchmarks/tensor_products.py --lmax 2 --edges 100 --repeats 1 --in-process   # smoke test
    python benchmarks/tensor_products.py --device cuda --channels 16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("grid", "fourier", "e3nn")


# ------------------------------------------------------------------------------------------------------------------
# worker side: one (method, L) case
# ------------------------------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak bytes a block adds on top of what is allocated when it starts (see the module docstring)."""

    def __init__(self, device):
        self.device, self.bytes, self.approximate = device, None, False

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _malloc_trim()  # hand freed heap pages back, so that reusing them shows up in the peak RSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.start = _proc_status("VmRSS")
        except OSError:
            import resource

            self.approximate = True  # ru_maxrss never decreases: a delta only shows growth past earlier peaks
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.approximate:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start
        else:
            self.bytes = _proc_status("VmHWM") - self.start
        return False


def _median_time(fn, device, repeats, budget):
    """(median seconds, calls, fastest seconds) of fn() over up to ``repeats`` calls (at least min(3, repeats)),
    after one warm-up call."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    n = max(min(3, repeats), min(repeats, int(budget / max(first, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n, min(times)


def _gaunt_path_weights(lmax):
    """c(l1, l2, l3) with ∫ Y Y Y dΩ = c wigner_3j, from matkit's Gaunt coefficients (0 where the path vanishes)."""
    import torch
    from e3nn import o3
    from matkit.nn.gaunt import gaunt_coefficients

    g = gaunt_coefficients(lmax, lmax, lmax)
    weights = {}
    for l1 in range(lmax + 1):
        for l2 in range(lmax + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, lmax) + 1):
                w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
                block = g[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2, l3 * l3:(l3 + 1) ** 2]
                weights[l1, l2, l3] = float((block * w3j).sum())
    return weights


def build_e3nn(lmax, channels):
    """e3nn uvu TensorProduct over all parity-allowed paths; weights = Gaunt path weights / 4π (fixed)."""
    import torch
    from e3nn import o3

    irreps_sh = o3.Irreps.spherical_harmonics(lmax)  # 1x0e + 1x1o + 1x2e + ...
    irreps_x = o3.Irreps([(channels, ir) for _, ir in irreps_sh])
    instructions = [(i1, i2, i3, "uvu", True)
                    for i1, (_, ir1) in enumerate(irreps_x) for i2, (_, ir2) in enumerate(irreps_sh)
                    for i3, (_, ir3) in enumerate(irreps_x) if ir3 in ir1 * ir2]
    tp = o3.TensorProduct(irreps_x, irreps_sh, irreps_x, instructions, irrep_normalization="none",
                          path_normalization="none", internal_weights=True, shared_weights=True)
    c = _gaunt_path_weights(lmax)
    with torch.no_grad():
        for ins, w in zip(tp.instructions, tp.weight_views(yield_instruction=False)):
            l1, l2, l3 = irreps_x[ins.i_in1].ir.l, irreps_sh[ins.i_in2].ir.l, irreps_x[ins.i_out].ir.l
            w.fill_(c[l1, l2, l3] / (4 * math.pi))
    tp.weight.requires_grad_(False)
    return tp, len(instructions)


def to_e3nn_layout(x, lmax):
    """(..., C, (L+1)^2) -> e3nn irreps layout (..., C*(L+1)^2): for each l, the (C, 2l+1) block flattened."""
    import torch

    return torch.cat([x[..., l * l:(l + 1) ** 2].flatten(-2) for l in range(lmax + 1)], dim=-1)


def from_e3nn_layout(x, lmax, channels):
    import torch

    blocks, start = [], 0
    for l in range(lmax + 1):
        size = channels * (2 * l + 1)
        blocks.append(x[..., start:start + size].unflatten(-1, (channels, 2 * l + 1)))
        start += size
    return torch.cat(blocks, dim=-1)


def run_case(method, lmax, edges, channels, repeats, budget, device, dtype_name, max_call_seconds, check=True):
    """Measure one (method, L) case; returns a JSON-able dict."""
    import torch
    from matkit.nn.gaunt import GauntTensorProduct

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(lmax)
    k = (lmax + 1) ** 2
    row = {"method": method, "L": lmax, "edges": edges, "channels": channels}

    def inputs(n):
        x1 = torch.randn(n, channels, k, generator=gen, dtype=torch.float64)
        x2 = torch.randn(n, 1, k, generator=gen, dtype=torch.float64)
        return x1, x2

    if method == "e3nn":
        t0 = time.perf_counter()
        op, row["paths"] = build_e3nn(lmax, channels)
        op = op.to(device=device, dtype=dtype)
        row["build_s"] = time.perf_counter() - t0

        def prepare(x1, x2):
            return (to_e3nn_layout(x1, lmax).to(device, dtype).contiguous(), x2[:, 0].to(device, dtype).contiguous())
    else:
        backends = ["dft", "fft"] if method == "fourier" else ["dft"]
        ops = {b: GauntTensorProduct(lmax, lmax, lmax, method, fourier_backend=b).to(device=device, dtype=dtype)
               for b in backends}

        def prepare(x1, x2):
            return x1.to(device, dtype).contiguous(), x2.to(device, dtype).contiguous()

        op = ops["dft"]
        if method == "fourier":  # pick the faster backend on a slice of the edges
            probe = prepare(*inputs(min(edges, 1000)))
            probe_times = {}
            with torch.no_grad():
                for b, candidate in ops.items():
                    probe_times[b] = _median_time(lambda: candidate(*probe), device, 3, 5.0)[0]
            row["backend"] = min(probe_times, key=probe_times.get)
            row["probe_ms"] = {b: t * 1e3 for b, t in probe_times.items()}
            op = ops[row["backend"]]
            del probe

    if check:  # matched computation: every method equals matkit's grid route on a few edges
        x1, x2 = inputs(8)
        ref = GauntTensorProduct(lmax, lmax, lmax, "grid")(x1, x2)
        with torch.no_grad():
            out = op(*prepare(x1, x2)).double().cpu()
        if method == "e3nn":
            out = from_e3nn_layout(out, lmax, channels)
        row["check"] = float((out - ref).abs().max() / ref.abs().max())

    # e3nn at large L: measure on fewer edges if a forward+backward would take too long, scale linearly
    used = edges
    if method == "e3nn" and edges > 1000:
        a, b = prepare(*inputs(1000))
        a.requires_grad_(True)
        b.requires_grad_(True)
        op(a, b).sum().backward()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        op(a, b).sum().backward()
        _sync(device)
        predicted = (time.perf_counter() - t0) * edges / 1000
        if predicted > max_call_seconds:
            used = max(1000, int(edges * max_call_seconds / predicted))
        del a, b
    row["edges_measured"] = used
    scale = edges / used

    x1, x2 = prepare(*inputs(used))
    with torch.no_grad():
        op(x1[:2], x2[:2])  # lazy set-up (e3nn code generation, buffer casts) outside the measurements
    x1.requires_grad_(True)
    x2.requires_grad_(True)
    with torch.no_grad():
        out_shape = (used, *op(x1[:1], x2[:1]).shape[1:])
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device, dtype)

    def forward():
        with torch.no_grad():
            return op(x1, x2)

    def forward_backward():
        x1.grad = x2.grad = None
        op(x1, x2).backward(grad_out)

    with PeakMemory(device) as mem_fwd:
        forward()
    with PeakMemory(device) as mem_fb:
        forward_backward()
    row["mem_fwd_mb"] = mem_fwd.bytes * scale / 2**20
    row["mem_fwdbwd_mb"] = mem_fb.bytes * scale / 2**20
    row["mem_approximate"] = mem_fb.approximate
    t, n, fastest = _median_time(forward, device, repeats, budget)
    row["fwd_ms"], row["fwd_repeats"], row["fwd_min_ms"] = t * scale * 1e3, n, fastest * scale * 1e3
    t, n, fastest = _median_time(forward_backward, device, repeats, budget)
    row["fwdbwd_ms"], row["fwdbwd_repeats"], row["fwdbwd_min_ms"] = t * scale * 1e3, n, fastest * scale * 1e3
    return row


def worker(cfg):
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(cfg["threads"])
    try:
        row = run_case(cfg["method"], cfg["L"], cfg["edges"], cfg["channels"], cfg["repeats"], cfg["budget"],
                       cfg["device"], cfg["dtype"], cfg["max_call_seconds"], cfg.get("check", True))
    except Exception as err:  # e.g. out of memory: report and keep going
        row = {"method": cfg["method"], "L": cfg["L"], "error": f"{type(err).__name__}: {err}"[:300]}
    return row


# ------------------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------------------
def run_subprocess(cfg):
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if rows:
        return rows[0]
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"method": cfg["method"], "L": cfg["L"], "error": f"worker exit {proc.returncode}: {tail}"[:300]}


def fit_exponent(rows, key, lmin=2, lmax=8):
    import numpy as np

    pts = [(r["L"], r[key]) for r in rows if lmin <= r["L"] <= lmax and key in r]
    if len(pts) < 2:
        return None
    ls, ts = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(ls, ts, 1)[0])


def _num(value):
    return (f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10
            else f"{value:.1f}" if value < 1000 else f"{value:.0f}")


def _fmt(row, key, fmt=None):
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    mark = "*" if row.get("edges_measured", row.get("edges")) != row.get("edges") else ""
    if key.startswith("mem") and row.get("mem_approximate"):
        mark += "~"
    return (fmt.format(row[key]) if fmt else _num(row[key])) + mark


def _ratio(a, b, key):
    if a is None or b is None or key not in a or key not in b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def report(results, args):
    lines = []
    out = lines.append
    by = {(r["method"], r["L"]): r for r in results}
    ls = sorted({r["L"] for r in results})
    has = {m: any(r["method"] == m for r in results) for m in METHODS}
    for key, title in (("fwd_ms", "forward, ms"), ("fwdbwd_ms", "forward+backward, ms")):
        out(f"\n### {title} (median)\n")
        out("| L | e3nn paths | grid | fourier (backend) | e3nn | e3nn/grid | e3nn/fourier |")
        out("|---:|---:|---:|---:|---:|---:|---:|")
        for lmax in ls:
            g, f, e = by.get(("grid", lmax)), by.get(("fourier", lmax)), by.get(("e3nn", lmax))
            fb = f" ({f['backend']})" if f and "backend" in f else ""
            paths = e.get("paths", "-") if e else "-"
            out(f"| {lmax} | {paths} | {_fmt(g, key)} | {_fmt(f, key)}{fb} | {_fmt(e, key)} | "
                f"{_ratio(e, g, key)} | {_ratio(e, f, key)} |")
    out("\n### peak extra memory of one call, MB (forward / forward+backward)\n")
    out("| L | grid | fourier | e3nn |")
    out("|---:|---:|---:|---:|")
    for lmax in ls:
        cells = []
        for m in METHODS:
            r = by.get((m, lmax))
            cells.append("-" if r is None else "error" if "error" in r else
                         f"{_fmt(r, 'mem_fwd_mb', '{:.0f}')} / {_fmt(r, 'mem_fwdbwd_mb', '{:.0f}')}")
        out(f"| {lmax} | " + " | ".join(cells) + " |")
    fits = [l for l in ls if 2 <= l <= 8]
    out(f"\n### time ~ L^p, least-squares fit over L = {fits[0] if fits else '-'}..{fits[-1] if fits else '-'}\n")
    out("| method | p (forward) | p (forward+backward) |")
    out("|---|---:|---:|")
    for m in METHODS:
        if has[m]:
            rows = [r for r in results if r["method"] == m and "error" not in r]
            pf, pb = fit_exponent(rows, "fwd_ms"), fit_exponent(rows, "fwdbwd_ms")
            out(f"| {m} | {'-' if pf is None else f'{pf:.2f}'} | {'-' if pb is None else f'{pb:.2f}'} |")
    checks = [f"{r['method']} L={r['L']}: {r['check']:.1e}" for r in results if "check" in r]
    notes = []
    if any(r.get("edges_measured", r.get("edges")) != r.get("edges") for r in results if "error" not in r):
        notes.append("* measured on fewer edges (see edges_measured in --json), scaled linearly to "
                     f"{args.edges} edges")
    if any(r.get("mem_approximate") for r in results):
        notes.append("~ memory from ru_maxrss deltas (clear_refs unavailable): a lower bound")
    for r in results:
        if "error" in r:
            notes.append(f"{r['method']} L={r['L']}: {r['error']}")
    if checks:
        notes.append("max relative difference to matkit's grid route on 8 edges: " + ", ".join(checks))
    for n in notes:
        out(f"\n{n}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmin", type=int, default=1)
    parser.add_argument("--lmax", type=int, default=8)
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (after one warm-up)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per case and mode before cutting repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-call-seconds", type=float, default=60.0,
                        help="e3nn: measure on fewer edges (scaled linearly) if one forward+backward would take longer")
    parser.add_argument("--in-process", action="store_true",
                        help="run all cases in this process (faster start-up; memory readings less isolated)")
    parser.add_argument("--no-check", action="store_true", help="skip the check that all methods agree")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if args.in_process:
        import torch

        torch.set_num_threads(args.threads)
    header = (f"uvu product x1 (E, C, (L+1)^2) x x2 (E, 1, (L+1)^2) -> (E, C, (L+1)^2): E={args.edges} edges, "
              f"C={args.channels} channels, {args.dtype}, device={args.device}, threads={args.threads}, "
              f"repeats<={args.repeats}, {'in-process' if args.in_process else 'one subprocess per case'}")
    print(header, flush=True)
    results = []
    for lmax in range(args.lmin, args.lmax + 1):
        for method in methods:
            cfg = dict(method=method, L=lmax, edges=args.edges, channels=args.channels, repeats=args.repeats,
                       budget=args.budget, threads=args.threads, device=args.device, dtype=args.dtype,
                       max_call_seconds=args.max_call_seconds, check=not args.no_check)
            t0 = time.perf_counter()
            row = worker(cfg) if args.in_process else run_subprocess(cfg)
            results.append(row)
            summary = row.get("error") or (f"fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwdbwd_ms']:.2f} ms, "
                                           f"mem {row['mem_fwdbwd_mb']:.0f} MB" + (
                                               f" [{row['backend']}]" if "backend" in row else ""))
            print(f"  L={lmax} {method:8s} {summary}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": results}, indent=1))
    bad = [r for r in results if "error" in r or r.get("check", 0.0) > (1e-4 if args.dtype == "float32" else 1e-10)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
