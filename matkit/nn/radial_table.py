"""Tabulated radial functions: a learned function of the distance alone, replaced at inference by a spline.

Many potentials spend most of an inference call in radial MLPs, ``f(d) = act(W3 act(W2 act(W1 rbf(d)))) *
cutoff(d)``: a few hundred thousand multiply-adds per pair, all to evaluate a function of one number. Once the
weights are fixed, :class:`RadialTable` samples ``f`` and its derivative on ``knots`` evenly spaced distances in
float64 (forward-mode autograd, exact derivatives) and evaluates the cubic Hermite spline through them:
``O(C)`` work per pair instead of ``O(C^2)``, forces still the exact gradient of the (interpolated) energy.

Error: the spline matches values and first derivatives at the knots; between them its error is at most
``h^4 / 384 * max |f''''|`` (``h = (cutoff - start) / (knots - 1)``), which ``RadialTable.max_error`` measures
against ``f`` at the midpoints. With the calculator's float32 default (2048 knots) it is far below float32
rounding for the bundled models (``tests/test_radial_table.py``, numbers in ``benchmarks/README.md``); float64
inference keeps the exact MLPs by default.

The table is only valid for the weights it was built from: :func:`parameter_versions` gives a key that changes
whenever a parameter is modified in place (optimiser steps, ``load_state_dict``), and callers rebuild on change.
"""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import numpy as np
import torch
from numba import njit

__all__ = ["RadialTable", "parameter_versions", "cached_tables"]


def parameter_versions(parameters: Iterable[torch.Tensor]) -> Tuple:
    """A key that changes when any of ``parameters`` is replaced or modified in place."""
    return tuple((id(p), p._version) for p in parameters)


def cached_tables(model, parameters, like: torch.Tensor, make_functions, start: float = 0.0):
    """The radial tables of ``model`` for ``like``'s dtype and device, or None where they do not apply.

    They apply at inference only: ``model.radial_table_knots > 0``, eval mode and none of ``parameters`` (the
    weights the tabulated functions depend on) trainable. ``make_functions()`` returns the functions to tabulate
    (float64 distances -> (G, C_k)); the tables are cached on the model and rebuilt when a weight changes.
    """
    parameters = list(parameters)
    knots = int(getattr(model, "radial_table_knots", 0))
    if knots <= 0 or model.training or any(p.requires_grad for p in parameters):
        return None
    key = (like.dtype, like.device, knots, start, parameter_versions(parameters))
    cached = model.__dict__.get("_radial_table_cache")
    if cached is None or cached[0] != key:
        tables = [RadialTable(fn, model.cutoff, knots, like.dtype, like.device, start)
                  for fn in make_functions()]
        cached = model.__dict__["_radial_table_cache"] = (key, tables)
    return cached[1]


class RadialTable:
    """Cubic Hermite spline of ``fn``: distances (G,) Å -> (G, C) on ``[start, cutoff]``.

    ``fn`` must accept float64 distances (it is evaluated once, in float64, on ``knots`` points); the table is
    stored in ``dtype`` on ``device``. Calling the table on distances (G,) returns (G, C) in their dtype,
    differentiable with respect to the distances (forces, stress). Distances are clamped to ``[start, cutoff]``
    (``start`` > 0 for functions undefined at d = 0, e.g. ``sin(k d) / d`` bases; the calculators refuse pairs
    closer than :data:`~matkit.graph.MIN_PAIR_DISTANCE` anyway).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], cutoff: float, knots: int = 4096,
                 dtype: torch.dtype = torch.float32, device="cpu", start: float = 0.0):
        if knots < 2 or not 0 <= start < cutoff:
            raise ValueError(f"RadialTable needs knots >= 2 and 0 <= start < cutoff, got {knots}, {start}, {cutoff}")
        self.fn, self.cutoff, self.knots, self.start = fn, float(cutoff), int(knots), float(start)
        self.spacing = (self.cutoff - self.start) / (self.knots - 1)
        grid = torch.linspace(self.start, self.cutoff, self.knots, dtype=torch.float64, device=device)
        values, slopes = _value_and_slope(fn, grid)
        slopes = slopes * self.spacing                      # derivatives per unit of t = (d - d_k) / h
        v0, v1, m0, m1 = values[:-1], values[1:], slopes[:-1], slopes[1:]
        dv = v1 - v0
        # segment k: f = a + b t + c t^2 + e t^3 on t in [0, 1], the Hermite cubic through (v0, m0), (v1, m1);
        # the coefficients are formed in float64, so float32 tables do not lose the small differences dv
        coefficients = torch.stack((v0, m0, 3.0 * dv - 2.0 * m0 - m1, m0 + m1 - 2.0 * dv), 1)  # (K-1, 4, C)
        self.channels = values.shape[1]
        self.coefficients = coefficients.reshape(self.knots - 1, -1).to(dtype)

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        if d.device.type == "cpu" and d.dtype == self.coefficients.dtype:
            return _CompiledSpline.apply(d, self)
        return self.evaluate(d)

    def evaluate(self, d: torch.Tensor) -> torch.Tensor:
        """The spline as torch ops (any device; also the reference for the compiled CPU kernel)."""
        x = (d.clamp(self.start, self.cutoff) - self.start) / self.spacing
        k = x.detach().floor().clamp_(max=self.knots - 2).long()
        t = (x - k.to(x.dtype))[:, None]
        a, b, c, e = self.coefficients.index_select(0, k).view(-1, 4, self.channels).unbind(1)
        return a + t * (b + t * (c + t * e))

    def max_error(self) -> float:
        """Largest |spline - fn| at the segment midpoints (where it is largest), relative to max |fn| on the
        knots; the spline evaluated in float64."""
        device = self.coefficients.device
        exact64 = RadialTable(self.fn, self.cutoff, self.knots, torch.float64, device, self.start)
        mid = torch.linspace(self.start + 0.5 * self.spacing, self.cutoff - 0.5 * self.spacing, self.knots - 1,
                             dtype=torch.float64, device=device)
        with torch.no_grad():
            exact = self.fn(mid)
            error = (exact64(mid) - exact).abs().max()
        return float(error / exact.abs().max().clamp_min(1e-300))


class _CompiledSpline(torch.autograd.Function):
    """The spline on CPU as Numba loops: one pass writes (G, C); the backward returns dE/dd (G,) directly instead
    of differentiating a dozen (G, C) torch ops. First-order only (inference)."""

    @staticmethod
    def forward(ctx, d, table):
        coefficients = table.coefficients.view(table.knots - 1, 4, table.channels).numpy()
        dist = d.detach().contiguous().numpy()
        out = np.empty((dist.shape[0], table.channels), dtype=dist.dtype)
        _spline_forward(dist, coefficients, table.start, table.spacing, table.cutoff, out)
        ctx.save_for_backward(d)
        ctx.table = table
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (d,) = ctx.saved_tensors
        table = ctx.table
        coefficients = table.coefficients.view(table.knots - 1, 4, table.channels).numpy()
        grad_out = grad_out.contiguous().numpy()
        grad = np.empty(d.shape[0], dtype=grad_out.dtype)
        _spline_backward(d.detach().contiguous().numpy(), coefficients, table.start, table.spacing, table.cutoff,
                         grad_out, grad)
        return torch.from_numpy(grad), None


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _segment(d, start, spacing, cutoff, segments):
    """(segment k, t in [0, 1], inside) of a distance; outside [start, cutoff] the value is clamped (slope 0)."""
    inside = start <= d <= cutoff
    x = (min(max(d, start), cutoff) - start) / spacing
    k = min(int(np.floor(x)), segments - 1)
    return k, x - k, inside


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _spline_forward(d, coefficients, start, spacing, cutoff, out):
    for p in range(d.shape[0]):
        k, t, _ = _segment(d[p], start, spacing, cutoff, coefficients.shape[0])
        for c in range(coefficients.shape[2]):
            out[p, c] = coefficients[k, 0, c] + t * (coefficients[k, 1, c] + t * (
                coefficients[k, 2, c] + t * coefficients[k, 3, c]))


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _spline_backward(d, coefficients, start, spacing, cutoff, grad_out, grad):
    for p in range(d.shape[0]):
        k, t, inside = _segment(d[p], start, spacing, cutoff, coefficients.shape[0])
        total = 0.0
        if inside:
            for c in range(coefficients.shape[2]):
                total += grad_out[p, c] * (coefficients[k, 1, c] + t * (
                    2.0 * coefficients[k, 2, c] + 3.0 * t * coefficients[k, 3, c]))
        grad[p] = total / spacing


def _value_and_slope(fn, grid: torch.Tensor):
    """``fn(grid)`` (K, C) and its derivative with respect to each grid distance (K, C), float64."""
    with torch.enable_grad():
        values, slopes = torch.func.jvp(fn, (grid,), (torch.ones_like(grid),))
    return values.detach(), slopes.detach()
