"""The eSCN SO(2) convolution (Passaro & Zitnick, ICML 2023, section 3).

Coefficients are e3nn real spherical-harmonic coefficients stored l-major (index ``l^2 + l + m``, polar axis +y).
In a frame where the edge lies on +y, the edge's harmonics are non-zero only for m = 0, so the SO(3) convolution
(Clebsch-Gordan tensor product of the node features with Y(edge), learnable weight per path) only couples
coefficients with ``|m_out| = |m_in|``. It becomes, for every ``m``, a dense map over degrees ``l >= m``:

* ``m = 0``:  ``y_0 = W_0 x_0``  (real weights);
* ``m > 0``: the pair ``(x_{+m}, x_{-m})`` is one complex number, multiplied by ``W_m^r + i W_m^i``::

      y_{+m} = W_m^r x_{+m} - W_m^i x_{-m},     y_{-m} = W_m^r x_{-m} + W_m^i x_{+m}

  (a rotation about +y by ``g`` rotates each pair by ``m g`` and commutes with this product).

Orders are truncated to ``|m| <= mmax``. Parity: the ``W^i`` terms come from tensor-product paths with
``l_in + l_filter + l_out`` odd, which turn tensors into pseudo-tensors; without them (``chiral=False``) the
convolution is O(3)- rather than only SO(3)-equivariant (mirror images get the same energy).

As in eSCN, the weights are generated per edge from invariant edge features ``e``: ``W = fc2 diag(SiLU(A e)) fc1``
(bottleneck of ``hidden_channels``), so the cost per edge is independent of the (l_in, l_out) blocks.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TruncatedLayout", "SO2Convolution"]


class TruncatedLayout:
    """Index bookkeeping for coefficients with ``l <= lmax`` and ``|m| <= mmax`` (``K_t`` of them).

    ``order="l"``: l-major (the order of the full layout, restricted). ``order="m"``: m-major, blocks
    ``[m=0: l=0..lmax], [+1: l=1..lmax], [-1: l=1..lmax], [+2: l=2..lmax], ...``, in which every block of the
    SO(2) convolution is a contiguous slice (eSCN keeps its edge-frame coefficients in this order).

    Attributes
    ----------
    kept : (K_t,) indices into the full l-major layout ``(lmax+1)^2`` of the kept coefficients, in this order.
    zero_m : (lmax+1,) positions (in the truncated layout) of the m = 0 coefficients, l = 0..lmax.
    plus[m], minus[m] : (lmax+1-m,) positions of the +m / -m coefficients for l = m..lmax, m = 1..mmax.
    """

    def __init__(self, lmax: int, mmax: int, order: str = "l"):
        if not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        if order not in ("l", "m"):
            raise ValueError(f"order must be 'l' or 'm', got {order!r}")
        self.lmax, self.mmax, self.order = int(lmax), int(mmax), order
        if order == "l":
            pairs = [(l, m) for l in range(lmax + 1) for m in range(-l, l + 1) if abs(m) <= mmax]
        else:
            pairs = [(l, 0) for l in range(lmax + 1)]
            pairs += [(l, s * m) for m in range(1, mmax + 1) for s in (1, -1) for l in range(m, lmax + 1)]
        kept, position = [], {}
        for l, m in pairs:
            position[(l, m)] = len(kept)
            kept.append(l * l + l + m)
        self.kept = torch.tensor(kept, dtype=torch.long)
        self.zero_m = torch.tensor([position[(l, 0)] for l in range(lmax + 1)], dtype=torch.long)
        self.plus = [None] + [torch.tensor([position[(l, m)] for l in range(m, lmax + 1)])
                              for m in range(1, mmax + 1)]
        self.minus = [None] + [torch.tensor([position[(l, -m)] for l in range(m, lmax + 1)])
                               for m in range(1, mmax + 1)]

    @property
    def size(self) -> int:
        return len(self.kept)

    def degrees(self, m: int) -> int:
        """Number of degrees l with l >= m."""
        return self.lmax + 1 - m


class _GatedBottleneck(nn.Module):
    """``x -> fc2(fc1(x) * gate)``: a per-edge linear map of rank <= hidden (bias-free, so linear in x)."""

    def __init__(self, in_features: int, out_features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # x (E, ..., in), gate (E, hidden) broadcast over the middle dims
        shape = (gate.shape[0],) + (1,) * (x.dim() - 2) + (gate.shape[-1],)
        return self.fc2(self.fc1(x) * gate.view(shape))

    def matrix(self, gate: torch.Tensor) -> torch.Tensor:
        """The effective weight matrices (E, out, in)."""
        return torch.einsum("oh,eh,hi->eoi", self.fc2.weight, gate, self.fc1.weight)


class SO2Convolution(nn.Module):
    """SO(2) convolution of edge-frame coefficients (E, K_t, C_in) -> (E, K_t, C_out), weights from edge features.

    Parameters
    ----------
    lmax, mmax : degree and order truncation of the coefficients.
    in_channels, out_channels : channels C.
    hidden_channels : bottleneck size H of every per-m map.
    edge_channels : size of the invariant edge features that generate the weights.
    chiral : include the ``W^i`` (imaginary) part; SO(3)- but not reflection-equivariant.
    order : ``"l"`` or ``"m"``, the :class:`TruncatedLayout` order of the input and output coefficients.
    """

    def __init__(self, lmax: int, mmax: int, in_channels: int, out_channels: int, hidden_channels: int,
                 edge_channels: int, chiral: bool = False, order: str = "l"):
        super().__init__()
        self.layout = TruncatedLayout(lmax, mmax, order)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden = hidden_channels
        self.chiral = bool(chiral)
        lay = self.layout
        self.m0 = _GatedBottleneck(lay.degrees(0) * in_channels, lay.degrees(0) * out_channels, hidden_channels)
        self.real = nn.ModuleList([_GatedBottleneck(lay.degrees(m) * in_channels, lay.degrees(m) * out_channels,
                                                    hidden_channels) for m in range(1, mmax + 1)])
        self.imag = nn.ModuleList([_GatedBottleneck(lay.degrees(m) * in_channels, lay.degrees(m) * out_channels,
                                                    hidden_channels) for m in range(1, mmax + 1)]) if chiral else None
        self.num_gates = 1 + mmax * (2 if chiral else 1)
        self.gate = nn.Linear(edge_channels, self.num_gates * hidden_channels)
        m_major = torch.cat([lay.zero_m] + [torch.cat([lay.plus[m], lay.minus[m]]) for m in range(1, mmax + 1)])
        self.register_buffer("m_major", m_major, persistent=False)                 # m-major position -> l-major
        self.register_buffer("l_major", torch.argsort(m_major), persistent=False)  # and back
        self.block_sizes = [lay.degrees(0)] + [2 * lay.degrees(m) for m in range(1, mmax + 1)]

    def gates(self, edge_features: torch.Tensor) -> torch.Tensor:
        """(E, edge_channels) -> (E, num_gates, H)."""
        return torch.nn.functional.silu(self.gate(edge_features)).view(-1, self.num_gates, self.hidden)

    def forward(self, x: torch.Tensor, edge_features: torch.Tensor) -> torch.Tensor:
        """x (E, K_t, C_in) edge-frame coefficients, truncated layout; edge_features (E, edge_channels)."""
        e = x.shape[0]
        gates = self.gates(edge_features)
        # in m-major order ([m=0: l=0..L], [+1: l=1..L], [-1: l=1..L], [+2: ...], ...) every block is a contiguous
        # slice; l-major input is permuted once. split, not slicing: the backward of a slice writes into a
        # zero-filled copy of the whole input
        if self.layout.order == "l":
            x = x.index_select(1, self.m_major)
        parts = x.split(self.block_sizes, dim=1)
        n0 = self.layout.degrees(0)
        blocks = [self.m0(parts[0].reshape(e, -1), gates[:, 0]).view(e, n0, self.out_channels)]
        for m in range(1, self.layout.mmax + 1):
            n = self.layout.degrees(m)
            pair = parts[m].reshape(e, 2, n * x.shape[-1]).contiguous()   # (E, 2, n*C): (+m, -m); one matmul
            out = self.real[m - 1](pair, gates[:, m])
            if self.chiral:
                imag = self.imag[m - 1](pair, gates[:, self.layout.mmax + m])
                out = out + torch.stack([-imag[:, 1], imag[:, 0]], 1)
            blocks.append(out.view(e, 2 * n, self.out_channels))
        out = torch.cat(blocks, 1)
        return out.index_select(1, self.l_major) if self.layout.order == "l" else out

    def input_projection(self, l: int) -> torch.Tensor:
        """The first linear map of every order block read at its degree-``l`` input rows: (C_in, mmax + 1, H),
        zero for blocks ``m > l``. Block m's hidden features are ``sum_{l >= m} x_{l, +-m} @ P_l[:, m]``, so this
        map can act on coefficients before they are rotated into the edge frame (eSCN's
        :class:`matkit.nn.escn_kernels.ProjectGather`). Achiral convolutions only."""
        if self.chiral:
            raise NotImplementedError("input_projection: chiral convolutions have a second (imaginary) map")
        c, zero = self.in_channels, self.m0.fc1.weight.new_zeros(self.in_channels, self.hidden)
        blocks = [self.m0] + list(self.real)
        return torch.stack([blocks[m].fc1.weight[:, (l - m) * c:(l - m + 1) * c].T if m <= l else zero
                            for m in range(self.layout.mmax + 1)], 1)

    def forward_hidden(self, hidden: torch.Tensor, edge_features: torch.Tensor) -> torch.Tensor:
        """The convolution from its first linear map's outputs ``hidden`` (E, 1 + 2 mmax, H) (rows m = 0, +1, -1,
        +2, ..., as :meth:`input_projection` gives them): gates and second linear maps -> (E, K_t, C_out).
        Achiral convolutions only."""
        e, gates = hidden.shape[0], self.gates(edge_features)
        blocks = [self.m0.fc2(hidden[:, 0] * gates[:, 0]).view(e, -1, self.out_channels)]
        for m in range(1, self.layout.mmax + 1):
            pair = hidden[:, 2 * m - 1:2 * m + 1] * gates[:, m, None]
            blocks.append(self.real[m - 1].fc2(pair).view(e, -1, self.out_channels))
        out = torch.cat(blocks, 1)
        return out.index_select(1, self.l_major) if self.layout.order == "l" else out

    def effective_weights(self, edge_features: torch.Tensor) -> dict:
        """Per-edge linear maps: ``{0: W_0, m: (W_m^r, W_m^i or None)}``, W (E, n_l*C_out, n_l*C_in).

        Flattened index ``l_rel * C + c`` with ``l_rel = l - m``. Used to build the equivalent SO(3) convolution.
        """
        gates = self.gates(edge_features)
        weights = {0: self.m0.matrix(gates[:, 0])}
        for m in range(1, self.layout.mmax + 1):
            imag = self.imag[m - 1].matrix(gates[:, self.layout.mmax + m]) if self.chiral else None
            weights[m] = (self.real[m - 1].matrix(gates[:, m]), imag)
        return weights
