"""TensorNet (Simeon & De Fabritiis, NeurIPS 2023), numerically equivalent to torchmd-net 3.1.0's ``TensorNet``.

Every atom carries, per channel, a Cartesian 3x3 matrix ``X = I Id + A + S`` (scalar, skew = vector,
symmetric traceless = rank 2). Where the paper and the torchmd-net code differ we follow the code, so that
torchmd-net checkpoints load (:func:`matkit.convert.torchmdnet.load_torchmdnet_tensornet`):

* norms are *squared* Frobenius norms (normalisation ``X / (|X|^2 + 1)`` and the readout);
* every atom also sends a message to itself (torchmd-net's neighbour list has self-loops: ``d = 0``, unit
  vector 0); we add these terms per node instead of adding edges;
* the unit vector is ``(r_centre - r_neighbour) / d`` (torchmd-net's sign; matters for the SO(3) variant);
* the interaction edge MLP ends in an activation and is multiplied by the cosine cutoff, although the
  expnorm basis already contains one; the embedding's distance projections have no activation;
* channel mixers are bias-free (a bias on A or S would break equivariance);
* the readout is ``act(W LayerNorm([3 I^2, |A|^2, |S|^2]))`` followed by torchmd-net's ``Scalar`` output MLP
  (F -> F/2 -> 1); the per-atom outputs are what :meth:`raw_atomic_energies` returns.

A graph attribute ``charge`` (B,) (total charge per structure, e) enters as torchmd-net's ``(1 + 0.1 q)``
factor; absent means neutral.

matgl's TensorNet (the MatPES universal potentials, :mod:`matkit.convert.matgl`) is the same network with three
options set differently: ``radial_basis="smooth_bessel"`` (its smooth spherical Bessel basis, no expnorm),
``self_loops=False`` (its graphs have no self-edges) and ``readout="gated"`` (no activation after the output
linear; a gated MLP ``F -> F -> F -> F -> 1`` gives the atomic energies, matgl's ``WeightedReadOut``). Its other
conventions (the order of the species-pair embedding, how the 3F edge and node factors are split into I, A, S)
are fixed by the converter permuting weights, so they need no option.

Speed: the node state is a compact (9, N, F) component-first tensor (see :mod:`matkit.nn.tensornet_blocks`);
all distance-only edge features (basis, cutoff, edge MLPs) are computed once per *pair* of reverse edges;
the species-pair embedding is a table over the species present, built once per call. Outside training the two
edge sums run as Numba loops on CPU (:mod:`matkit.nn.tensornet_kernels`) and as edge-chunked torch ops on other
devices, so no (9, E, F) per-edge tensor is ever stored; training uses plain autograd ops (force losses need a
second backward pass).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from ..graph import graph_batch_vector
from ..nn.radial import ExpNormalBasis, SmoothBesselBasis, cosine_cutoff
from ..nn.radial_table import cached_tables
from ..nn.tensornet_blocks import (compose_matrix, decompose_matrix, geometric_messages, matmul_per_channel,
                                   mix_parts, neighbour_messages, reverse_pair_groups, squared_norms,
                                   total_squared_norm, traceless_outer_components)
from .base import Potential, register

__all__ = ["TensorNet"]

GROUPS = ("O(3)", "SO(3)")
RADIAL_BASES = ("expnorm", "smooth_bessel")
READOUTS = ("mlp", "gated")


class ShiftedSoftplus(nn.Module):
    def forward(self, x):
        return nn.functional.softplus(x) - math.log(2.0)


ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "ssp": ShiftedSoftplus}


def _mixer_weights(count: int, channels: int) -> nn.Parameter:
    """``count`` bias-free (F, F) channel mixers, initialised like ``nn.Linear`` (U(-1/sqrt(F), 1/sqrt(F)))."""
    bound = 1.0 / math.sqrt(channels)
    return nn.Parameter(torch.empty(count, channels, channels).uniform_(-bound, bound))


def _part_factors(factors: torch.Tensor) -> torch.Tensor:
    """Per-part factors (3, ..., F) -> per-component factors (9, ..., F) ([I, a, a, a, s, s, s, s, s])."""
    index = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2], device=factors.device)
    return factors.index_select(0, index)


class GatedMLP(nn.Module):
    """``MLP(x) * gate(x)``: two MLPs of the same widths; the value MLP has SiLU after every layer but the last,
    the gate MLP SiLU after every layer but the last and a sigmoid after it (matgl's ``GatedMLP``, activate_last
    False). ``forward``: (N, widths[0]) -> (N, widths[-1])."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()

        def mlp(last):
            layers = []
            for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers += [nn.Linear(a, b), nn.SiLU() if k < len(widths) - 2 else last]
            return nn.Sequential(*layers)

        self.layers, self.gates = mlp(nn.Identity()), mlp(nn.Sigmoid())

    def forward(self, x):
        return self.layers(x) * self.gates(x)


class TensorEmbedding(nn.Module):
    """Initial node tensors from neighbour directions, distances and the (centre, neighbour) species pair."""

    def __init__(self, num_species: int, channels: int, num_rbf: int, activation: type):
        super().__init__()
        self.channels = channels
        self.species_embedding = nn.Embedding(num_species, channels)
        self.pair_linear = nn.Linear(2 * channels, channels)           # torchmd-net emb2
        self.distance_proj = nn.Linear(num_rbf, 3 * channels)          # distance_proj1..3 stacked
        self.tensor_mixers = _mixer_weights(3, channels)               # linears_tensor[0..2]
        self.init_norm = nn.LayerNorm(channels)
        self.scalar_mlp = nn.Sequential(nn.Linear(channels, 2 * channels), activation(),
                                        nn.Linear(2 * channels, 3 * channels), activation())

    def pair_table(self, present: torch.Tensor) -> torch.Tensor:
        """(P, P, F) table of ``W [emb(centre) || emb(neighbour)] + b`` for the species indices ``present`` (P,)."""
        emb = self.species_embedding(present)
        n = emb.shape[0]
        pairs = torch.cat((emb[:, None, :].expand(n, n, -1), emb[None, :, :].expand(n, n, -1)), -1)
        return self.pair_linear(pairs)

    def forward(self, species, src, dst, unit, group, radial_cut, self_radial_cut):
        """species (N,); src/dst (E,); unit (E, 3) torchmd-net-sign unit vectors; group (E,) pair group of
        each edge; radial_cut (G, 3F) = cutoff * distance projections per pair group; self_radial_cut (3F,) the
        same at d = 0, or None for no self-loop -> X (9, N, F)."""
        n, f = species.shape[0], self.channels
        present, local = torch.unique(species, return_inverse=True)   # only the species in this graph
        table = self.pair_table(present).view(-1, f)
        p = present.shape[0]
        geometry = torch.cat((unit.new_ones(1, unit.shape[0]), unit.t(), traceless_outer_components(unit)), 0)
        X = geometric_messages(geometry, radial_cut.view(-1, 3, f), table, group, local[dst] * p + local[src], dst,
                               n, fused=not self.training)                  # (9, N, F)
        if self_radial_cut is not None:  # self-loop: d = 0, zero unit vector -> only the isotropic part
            z_self = table.index_select(0, local * (p + 1))
            X = X + torch.cat((z_self[None] * self_radial_cut[:f], X.new_zeros(8, n, f)), 0)

        scales = self.scalar_mlp(self.init_norm(total_squared_norm(X)))      # (N, 3F)
        scales = scales.view(n, 3, f).permute(1, 0, 2)
        W = self.tensor_mixers
        return mix_parts(X, W[0], W[1], W[2]) * _part_factors(scales)


class Interaction(nn.Module):
    """One TensorNet interaction: normalise, mix, message-pass, matrix product, mix, residual + square."""

    def __init__(self, channels: int, num_rbf: int, activation: type, group: str):
        super().__init__()
        self.channels, self.group = channels, group
        self.radial_mlp = nn.Sequential(nn.Linear(num_rbf, channels), activation(),
                                        nn.Linear(channels, 2 * channels), activation(),
                                        nn.Linear(2 * channels, 3 * channels), activation())
        self.tensor_mixers = _mixer_weights(6, channels)                       # linears_tensor[0..5]

    def edge_factors(self, rbf: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """(G, K) basis and (G,) cutoff -> (G, 3F) per-part message factors."""
        return self.radial_mlp(rbf) * cut[:, None]

    def forward(self, X, src, dst, factors, group, self_factors, charge_factor):
        """X (9, N, F); factors (G, 3F) per group of reverse edges, group (E,) the group of each edge;
        self_factors (3F,), or None for no self-loop; charge_factor (N, 1) or None -> X (9, N, F)."""
        n, f = X.shape[1], self.channels
        W = self.tensor_mixers
        X = X / (total_squared_norm(X) + 1.0)
        Y = mix_parts(X, W[0], W[1], W[2])
        messages = neighbour_messages(Y, factors.view(-1, 3, f), src, dst, n, group=group, fused=not self.training)
        if self_factors is not None:
            messages = messages + Y * _part_factors(self_factors.view(3, 1, f))
        Yf, Mf = compose_matrix(Y), compose_matrix(messages)
        if self.group == "O(3)":
            product = matmul_per_channel(Mf, Yf) + matmul_per_channel(Yf, Mf)
            if charge_factor is not None:
                product = product * charge_factor
        else:
            product = 2.0 * matmul_per_channel(Yf, Mf)
        P = decompose_matrix(product)
        P = P / (total_squared_norm(P) + 1.0)
        dX = mix_parts(P, W[3], W[4], W[5])
        dXf = compose_matrix(dX)
        square = decompose_matrix(matmul_per_channel(dXf, dXf))
        if charge_factor is not None:
            square = square * charge_factor
        return X + dX + square


def _distance_features(rbf, cutoff, proj, layers, d):
    basis, cut = rbf(d), cutoff(d)
    return [proj(basis) * cut[:, None]] + [layer.edge_factors(basis, cut) for layer in layers]


@register("tensornet")
class TensorNet(Potential):
    """TensorNet potential.

    Parameters
    ----------
    species : supported atomic numbers.
    cutoff : upper cutoff (Å), torchmd-net ``cutoff_upper``.
    hidden_channels, num_layers, num_rbf : width F, interaction layers, number of expnorm functions.
    cutoff_lower : lower cutoff (Å) of the basis and of the cosine switch.
    activation : "silu" (default), "tanh", "sigmoid" or "ssp".
    group : "O(3)" (anticommutator product, parity-invariant energies) or "SO(3)" (plain product).
    trainable_rbf : make the basis means / widths trainable (expnorm only).
    output_hidden_layers : extra hidden (F/2 -> F/2) layers of the output MLP (torchmd-net ``output_mlp_num_layers``;
        ``readout="mlp"`` only).
    radial_basis : "expnorm" (torchmd-net; includes a cosine cutoff) or "smooth_bessel" (matgl:
        :class:`~matkit.nn.radial.SmoothBesselBasis` with ``num_rbf`` functions, matgl's ``max_n``).
    self_loops : every atom also messages itself at d = 0 (torchmd-net: True; matgl: False).
    readout : "mlp" (torchmd-net: ``act(linear)`` then F -> F/2 -> 1) or "gated" (matgl: ``linear`` then the gated
        MLP F -> F -> F -> F -> 1 of :class:`GatedMLP`).
    """

    def __init__(self, species: Sequence[int] = (1, 6, 7, 8), cutoff: float = 5.0, hidden_channels: int = 128,
                 num_layers: int = 2, num_rbf: int = 32, cutoff_lower: float = 0.0, activation: str = "silu",
                 group: str = "O(3)", trainable_rbf: bool = False, output_hidden_layers: int = 0,
                 radial_basis: str = "expnorm", self_loops: bool = True, readout: str = "mlp"):
        super().__init__(species=species, cutoff=cutoff)
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden_channels < 2 or num_layers < 0:
            raise ValueError(f"need hidden_channels >= 2 and num_layers >= 0, got {hidden_channels}, {num_layers}")
        if radial_basis not in RADIAL_BASES:
            raise ValueError(f"radial_basis must be one of {RADIAL_BASES}, got {radial_basis!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if radial_basis == "smooth_bessel" and (cutoff_lower != 0 or trainable_rbf):
            raise ValueError("radial_basis='smooth_bessel' needs cutoff_lower=0 and trainable_rbf=False")
        if readout == "gated" and output_hidden_layers:
            raise ValueError("output_hidden_layers applies to readout='mlp' only")
        act = ACTIVATIONS[activation]
        self.channels, self.group = int(hidden_channels), group
        self.cutoff_lower = float(cutoff_lower)
        self.self_loops, self.readout = bool(self_loops), readout
        if radial_basis == "expnorm":
            self.rbf = ExpNormalBasis(cutoff_lower, cutoff, num_rbf, trainable=trainable_rbf)
        else:
            self.rbf = SmoothBesselBasis(cutoff, num_rbf)
        self.embedding = TensorEmbedding(self.num_species, hidden_channels, num_rbf, act)
        self.layers = nn.ModuleList(Interaction(hidden_channels, num_rbf, act, group) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(3 * hidden_channels)
        self.out_linear = nn.Linear(3 * hidden_channels, hidden_channels)
        if readout == "gated":
            self.act = nn.Identity()
            self.output_mlp = GatedMLP([hidden_channels] * 4 + [1])
        else:
            self.act = act()
            half = hidden_channels // 2
            head = [nn.Linear(hidden_channels, half), act()]
            for _ in range(output_hidden_layers):
                head += [nn.Linear(half, half), act()]
            head.append(nn.Linear(half, 1))
            self.output_mlp = nn.Sequential(*head)
            self._init_output_mlp()

    def _init_output_mlp(self):
        # torchmd-net's MLP: Xavier-uniform weights, zero biases
        for layer in self.output_mlp:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _cutoff(self, d: torch.Tensor) -> torch.Tensor:
        return cosine_cutoff(d, self.cutoff, self.cutoff_lower)

    def _charge_factor(self, graph, num_nodes: int, dtype):
        charge = getattr(graph, "charge", None)
        if charge is None:
            return None
        charge = torch.as_tensor(charge, dtype=dtype, device=self.out_linear.weight.device).reshape(-1)
        return (1.0 + 0.1 * charge[graph_batch_vector(graph)]).view(num_nodes, 1)

    def node_features(self, graph, species: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        """Final node tensors X (9, N, F) in the compact layout."""
        src, dst = graph.edge_index[0], graph.edge_index[1]
        n = species.shape[0]
        d = torch.linalg.vector_norm(edge_vec, dim=-1)
        unit = -edge_vec / d[:, None]            # torchmd-net sign: centre minus neighbour
        # distance-only features, once per pair of reverse edges
        representative, group = reverse_pair_groups(graph.edge_index, graph.shifts, n)
        d_pair = d.index_select(0, representative)
        zero = d.new_zeros(1)  # self-loop features are those at d = 0
        tables = self._radial_tables(d_pair)
        if tables is not None:  # inference: splines of the distance-only features (matkit.nn.radial_table)
            radial = [table(d_pair) for table in tables]
            radial_self = [table(zero)[0] for table in tables] if self.self_loops else [None] * len(tables)
        else:
            radial = self.distance_features(d_pair)
            radial_self = [f[0] for f in self.distance_features(zero)] if self.self_loops else [None] * len(radial)
        X = self.embedding(species, src, dst, unit, group, radial[0], radial_self[0])
        charge_factor = self._charge_factor(graph, n, X.dtype)
        for layer, factors, self_factors in zip(self.layers, radial[1:], radial_self[1:]):
            X = layer(X, src, dst, factors, group, self_factors, charge_factor)
        return X

    def distance_features(self, d: torch.Tensor):
        """The distance-only features, d (G,) Å -> [(G, 3F)]: the embedding's distance projection, then each
        interaction's edge factors, all times the cutoff."""
        return _distance_features(self.rbf, self._cutoff, self.embedding.distance_proj, self.layers, d)

    def _radial_functions(self):
        """The functions the radial tables sample: the distance features of float64 copies, one per output."""
        rbf, proj, layers = (copy.deepcopy(m).double() for m in (self.rbf, self.embedding.distance_proj, self.layers))
        return [lambda d, k=k: _distance_features(rbf, self._cutoff, proj, layers, d)[k]
                for k in range(1 + len(self.layers))]

    def _radial_tables(self, d: torch.Tensor):
        """The radial tables (embedding, then each layer) at inference, else None (see ``cached_tables``)."""
        params = [*self.rbf.parameters(), *self.embedding.distance_proj.parameters(),
                  *(p for layer in self.layers for p in layer.radial_mlp.parameters())]
        return cached_tables(self, params, d, self._radial_functions)

    def raw_atomic_energies(self, graph, species, edge_vec):
        X = self.node_features(graph, species, edge_vec)
        n = species.shape[0]
        invariants = squared_norms(X).permute(1, 0, 2).reshape(n, 3 * self.channels)  # [3 I^2 | |A|^2 | |S|^2]
        x = self.act(self.out_linear(self.out_norm(invariants)))
        return self.output_mlp(x).squeeze(-1)
