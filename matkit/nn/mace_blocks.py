"""Building blocks of the Gaunt-MACE potential (:mod:`matkit.models.gaunt_mace`).

Feature layout: every equivariant feature is a tensor ``(N, K, C)`` with channels last, ``K = (L+1)^2``
coefficients of e3nn real spherical harmonics (component normalisation, ``Y_00 = 1``, index ``l^2 + l + m``).
Channel ``c`` of a feature is read as a function on the sphere, ``f_c(x) = sum_lm x_{lm,c} Y_lm(x)``; degree-l
coefficients carry the natural parity ``(-1)^l`` (irreps 0e + 1o + 2e + 3o ...).

Gaunt tensor product (Luo, Chen & Krishnapriyan 2024): the product of two such functions projected back onto
spherical harmonics, ``(x ⊗_G y)_{l3 m3} = (1/4pi) ∫ f_x f_y Y_{l3 m3} dOmega``. It is a Clebsch-Gordan product
whose path weights are fixed to the Gaunt coefficients, so paths with odd ``l1 + l2 + l3`` vanish. It is computed
here on an S^2 grid (Gauss-Legendre in cos(beta) x uniform in alpha) built from e3nn's own spherical harmonics;
with enough points (see :func:`matkit.nn.sphere_grid.grid_size_for_degree`) the quadrature is exact, hence so is
the equivariance.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from .gaunt import GauntPower
from .mace_kernels import SlotMessage
from .sphere_grid import SphereGrid, degree_of_coefficient

__all__ = ["gaunt_product",
           "IrrepsLinear", "SpeciesIrrepsLinear", "RadialMLP", "NeighbourSlots",
           "GauntManyBodyProduct", "GauntInteraction", "ScaledSiLU"]


def num_coefficients(lmax: int) -> int:
    return (lmax + 1) ** 2


def gaunt_product(x: torch.Tensor, y: torch.Tensor, lmax_x: int, lmax_y: int, lmax_out: int) -> torch.Tensor:
    """Channel-wise Gaunt tensor product of (..., K_x, C) and (..., K_y, C) -> (..., K_out, C), on an exact grid.

    Functional convenience (builds the grid on each call); modules cache a :class:`SphereGrid` instead.
    """
    grid_x = SphereGrid(lmax_x, lmax_out, degree=lmax_x + lmax_y + lmax_out).to(x.device)
    grid_y = SphereGrid(lmax_y, lmax_out, degree=lmax_x + lmax_y + lmax_out).to(x.device)
    return grid_x.from_grid(grid_x.to_grid(x) * grid_y.to_grid(y))


class ScaledSiLU(nn.Module):
    """SiLU divided by its root second moment under a unit normal input (as e3nn's ``normalize2mom``)."""

    factor = 1.0 / 0.5965707  # 1 / sqrt(E[silu(z)^2]), z ~ N(0, 1)

    def forward(self, x):
        return torch.nn.functional.silu(x) * self.factor


class RadialMLP(nn.Module):
    """Bias-free MLP with normalised SiLU (MACE's radial network): zero input -> zero output, so edge weights
    inherit the envelope's smooth decay at the cutoff. ``sizes`` = [in, hidden..., out]; (E, in) -> (E, out)."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        layers: List[nn.Module] = []
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(a, b, bias=False)
            nn.init.normal_(linear.weight, std=1.0 / math.sqrt(a))
            layers.append(linear)
            if k < len(sizes) - 2:
                layers.append(ScaledSiLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class IrrepsLinear(nn.Module):
    """Equivariant linear map: one (C_in, C_out) matrix per degree l, shared over m. (N, K, C_in) -> (N, K, C_out)."""

    def __init__(self, c_in: int, c_out: int, lmax: int):
        super().__init__()
        self.c_in, self.c_out, self.lmax = c_in, c_out, lmax
        self.weight = nn.Parameter(torch.randn(lmax + 1, c_in, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = 1.0 / math.sqrt(self.c_in)
        if self.lmax == 0:
            return torch.matmul(x[:, :1], self.weight[0]) * norm
        blocks = [torch.matmul(x[:, l * l:(l + 1) ** 2], self.weight[l]) for l in range(self.lmax + 1)]
        return torch.cat(blocks, dim=1) * norm


class SpeciesIrrepsLinear(nn.Module):
    """Element-dependent equivariant linear map (MACE's self-connection ``FCTP(h, onehot(z))``).

    One (C_in, C_out) matrix per (species, degree). (N, K, C_in), species (N,) -> (N, K, C_out).
    """

    def __init__(self, c_in: int, c_out: int, lmax: int, num_species: int):
        super().__init__()
        self.c_in, self.c_out, self.lmax = c_in, c_out, lmax
        self.weight = nn.Parameter(torch.randn(num_species, lmax + 1, c_in, c_out))

    def forward(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        k = num_coefficients(self.lmax)
        x = x[:, :k]
        norm = 1.0 / math.sqrt(self.c_in)
        out = x.new_zeros(x.shape[0], k, self.c_out)
        for s in torch.unique(species).tolist():
            index = torch.nonzero(species == s).squeeze(1)
            xs = x.index_select(0, index)
            blocks = [torch.matmul(xs[:, l * l:(l + 1) ** 2], self.weight[s, l]) for l in range(self.lmax + 1)]
            out = out.index_copy(0, index, torch.cat(blocks, dim=1) * norm)
        return out


class NeighbourSlots:
    """Edges grouped by their centre atom into padded slots (N, M) for batched per-node contractions.

    src, dst : (E,) neighbour and centre of each edge (``edge_index[0]``, ``edge_index[1]``).
    ``flat`` (E,) is ``dst * M + rank of the edge among the edges of dst``; M = the largest neighbour count.
    ``sh_transposed`` (N, K, M): the edge SH placed in the slots (zeros in empty slots).
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int, edge_sh: torch.Tensor,
                 edge_radial: torch.Tensor):
        self.src, self.dst = edge_index[0], edge_index[1]
        self.num_nodes = num_nodes
        num_edges = self.dst.shape[0]
        counts = torch.bincount(self.dst, minlength=num_nodes)
        self.counts = counts  # (N,) filled slots of each node: the first counts[i]
        self.max_neighbours = int(counts.max()) if num_edges else 0
        order = torch.argsort(self.dst, stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(self.dst)
        rank[order] = torch.arange(num_edges, device=self.dst.device) - first[self.dst[order]]
        self.flat = self.dst * self.max_neighbours + rank
        self.sh_transposed = self.pad(edge_sh).transpose(1, 2)  # (N, K, M)
        self.radial_padded = self.pad(edge_radial)  # (N, M, num_radial); zero rows in empty slots
        # neighbour index of each slot (0 in empty slots: their radial weights are exactly zero)
        self.src_padded = self.src.new_zeros(num_nodes * self.max_neighbours).index_copy(0, self.flat, self.src)
        # edge of each slot (0 in empty slots, which the kernels skip)
        self.edge_of_slot = self.src.new_zeros(num_nodes * self.max_neighbours).index_copy(
            0, self.flat, torch.arange(num_edges, device=self.dst.device)).view(num_nodes, self.max_neighbours)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(E, F) per-edge rows -> (N, M, F) with zeros in empty slots (differentiable, out of place)."""
        padded = x.new_zeros(self.num_nodes * self.max_neighbours, x.shape[1]).index_copy(0, self.flat, x)
        return padded.view(self.num_nodes, self.max_neighbours, x.shape[1])


class GauntManyBodyProduct(nn.Module):
    """MACE's product basis with the symmetric contraction replaced by Gaunt self-products on the S^2 grid.

    ``B_{i,c,lm} = sum_{nu=1..correlation} w[z_i, c, nu, l] [ (s A_{i,c})^nu ]_{lm}``: channel ``c`` of ``A_i`` is
    one function on the sphere; it is evaluated on the grid once, raised to powers 1..nu pointwise, and every
    power is projected back to degrees <= lmax_out (:class:`matkit.nn.gaunt.GauntPower`).
    ``s = 1/sqrt((lmax_in+1)^2)`` makes unit-variance coefficients give unit-variance grid values. Weights
    depend on the element, the order nu, the output degree l and the channel (the "self-mix" basis of the
    Gaunt paper).

    forward: A (N, (lmax_in+1)^2, C), species (N,) -> B (N, (lmax_out+1)^2, C).
    """

    def __init__(self, num_channels: int, lmax_in: int, lmax_out: int, correlation: int, num_species: int):
        super().__init__()
        if correlation < 1:
            raise ValueError(f"correlation must be >= 1, got {correlation}")
        self.correlation, self.lmax_in, self.lmax_out = correlation, lmax_in, lmax_out
        self.power = GauntPower(lmax_in, lmax_out, correlation)  # exact grid of degree nu lmax_in + lmax_out
        self.scale = 1.0 / math.sqrt(num_coefficients(lmax_in))
        self.weights = nn.Parameter(torch.randn(num_species, num_channels, correlation, lmax_out + 1)
                                    / math.sqrt(correlation))
        self.register_buffer("degree", degree_of_coefficient(lmax_out), persistent=False)

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        powers = self.power(a.transpose(1, 2) * self.scale)  # (N, C, nu, K_out)
        weights = self.weights[species][..., self.degree]  # (N, C, nu, K_out)
        return (weights * powers).sum(dim=2).transpose(1, 2)


class GauntInteraction(nn.Module):
    """MACE residual interaction with a Gaunt-product message (``RealAgnosticResidualInteractionBlock`` analogue).

    With ``h`` the node features (N, K_h, C) of degree <= lmax_h and, per edge e = (j -> i),
    ``Y_e`` (E, K_Y) the SH of the edge direction and ``R_e`` radial weights from :class:`RadialMLP`:

    * ``h_up = Linear(h)``;
    * message ``m_e = (R1_e ∘ h_up_j) ⊗_G (R2_e ∘ Y_e)`` truncated to degree <= lmax_a, where
      ``(R1 ∘ h)_{l1 m1, c} = R1[e, l1, c] h_{l1 m1, c}`` and ``(R2 ∘ Y)_{l2 m2, c} = R2[e, l2, c] Y_{l2 m2}``.
      The weight of path (l1, l2) -> l3 for channel c is thus ``R1[e,l1,c] R2[e,l2,c] Gaunt(l1,l2,l3)``: a
      rank-one factorisation of MACE's per-path channel weights, independent of l3 (as in the GTP paper).
      For scalar ``h`` (the first layer, or a scalar-only model) R1 is redundant and only R2 is used: the
      message is then exactly MACE's ``h_j R[e,l,c] Y_lm``;
    * ``A_i = Linear(sum_{e into i} m_e) / avg_num_neighbors``.

    For ``lmax_h > 0`` the product runs on an exact S^2 grid: per edge, the weighted ``h_up_j`` and the weighted
    ``Y_e`` are put on the grid and multiplied, the products are summed over edges on the grid and projected
    once per node. With ``channelwise_y_weights=False`` R2 is shared by all channels (``R2[e, l2]``) and the
    message becomes one batched matrix product per node (:meth:`shared_y_grid_message`).
    Returns A (N, (lmax_a+1)^2, C).
    """

    def __init__(self, num_channels: int, lmax_h: int, max_ell: int, lmax_a: int, num_radial: int,
                 radial_mlp: Sequence[int], avg_num_neighbors: float, channelwise_y_weights: bool = True):
        super().__init__()
        self.num_channels, self.lmax_h, self.max_ell, self.lmax_a = num_channels, lmax_h, max_ell, lmax_a
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.channelwise_y_weights = bool(channelwise_y_weights) or lmax_h == 0
        self.linear_up = IrrepsLinear(num_channels, num_channels, lmax_h)
        if self.channelwise_y_weights:
            n_radial_out = ((max_ell + 1) + (lmax_h + 1 if lmax_h > 0 else 0)) * num_channels
        else:
            n_radial_out = (lmax_h + 1) * num_channels + (max_ell + 1)
        self.num_radial_out = n_radial_out
        self.radial = RadialMLP([num_radial, *radial_mlp, n_radial_out])
        self.linear = IrrepsLinear(num_channels, num_channels, lmax_a)
        if lmax_h > 0:
            degree = lmax_h + max_ell + lmax_a
            self.grid_h = SphereGrid(lmax_h, lmax_a, degree=degree)
            self.grid_y = SphereGrid(max_ell, lmax_a, degree=degree)

    def scalar_message(self, h_up, r2, slots: "NeighbourSlots", per_edge: bool = False):
        """MACE message for scalar node features: A[i, lm, c] = sum_{e into i} h_j[c] R2[e, l, c] Y_lm(e).

        Works on padded neighbour slots: r2 (N, M, L_Y+1, C) comes from the radial MLP applied to the padded
        radial features (zero in empty slots, as the MLP has no biases), or is (E, L_Y+1, C) per edge when
        ``per_edge`` (radial tables). Inference on CPU streams over the slots in one Numba pass
        (:mod:`matkit.nn.mace_kernels`); otherwise each degree block is one batched matrix product
        ``Y_pad_l^T (N, 2l+1, M) @ W_pad_l (N, M, C)`` and the (E, K, C) per-edge messages are never materialised.
        """
        n, m = slots.num_nodes, slots.max_neighbours
        lmax = min(self.max_ell, self.lmax_a)
        if not self.training and r2.device.type == "cpu" and r2.dtype == h_up.dtype:
            rows = slots.edge_of_slot if per_edge else torch.arange(n * m, device=r2.device).view(n, m)
            a = SlotMessage.apply(slots.sh_transposed, r2.reshape(-1, r2.shape[-2], r2.shape[-1]), h_up[:, 0],
                                  slots.src_padded.view(n, m), rows, slots.counts, lmax)
        else:
            if per_edge:
                r2 = slots.pad(r2.reshape(r2.shape[0], -1)).view(n, m, -1, self.num_channels)
            h_neighbour = h_up[:, 0].index_select(0, slots.src_padded).view(n, m, 1, self.num_channels)
            weighted = (r2[:, :, : lmax + 1] * h_neighbour).unbind(dim=2)  # L+1 tensors (N, M, C)
            a = torch.cat([torch.matmul(slots.sh_transposed[:, l * l:(l + 1) ** 2], weighted[l])
                           for l in range(lmax + 1)], dim=1)
        if self.lmax_a > self.max_ell:  # nothing reaches the higher degrees
            a = torch.cat([a, a.new_zeros(a.shape[0], num_coefficients(self.lmax_a) - a.shape[1], a.shape[2])], 1)
        return a

    def grid_message(self, h_up, r1, r2, edge_sh, src, dst):
        """Gaunt message for equivariant node features, summed over edges on the grid, projected per node."""
        grid_h, grid_y = self.grid_h, self.grid_y
        to_grid_h, to_grid_y = grid_h.to_grid_matrix(h_up.dtype), grid_y.to_grid_matrix(h_up.dtype)
        # h_j weighted per (degree l1, channel) in SH space, then put on the grid: (E, G, C)
        degree_h = degree_of_coefficient(self.lmax_h).to(h_up.device)
        h_edge = torch.matmul(to_grid_h, r1[:, degree_h] * h_up.index_select(0, src))
        # grid function of each degree block of Y_e: (E, L_Y+1, G); Y weighted per (l2, c): (E, G, C)
        y_blocks = torch.stack([torch.matmul(edge_sh[:, l * l:(l + 1) ** 2], to_grid_y[:, l * l:(l + 1) ** 2].T)
                                for l in range(self.max_ell + 1)], dim=1)
        y_edge = torch.matmul(y_blocks.transpose(1, 2), r2)  # (E, G, L_Y+1) @ (E, L_Y+1, C)
        product = h_edge * y_edge
        summed = product.new_zeros(h_up.shape[0], grid_h.num_points, self.num_channels).index_add(0, dst, product)
        return grid_h.from_grid(summed)

    def shared_y_grid_message(self, h_up, r1, r2, slots: "NeighbourSlots"):
        """Gaunt message with Y weights shared by all channels (``channelwise_y_weights=False``).

        r1 (N, M, L_h+1, C), r2 (N, M, L_Y+1) on padded neighbour slots. With the weighted Y_e on the grid,
        ``y (N, M, G)``, and ``W[i, s, k1, c] = R1[l1(k1), c] h_up[j(i,s), k1, c]``, the summed grid message is
        ``sum_k1 T[g, k1] (y^T @ W)[i, g, k1, c]``: one batched matrix product per node, and no (E, G, C) tensor.
        """
        n, m = r1.shape[0], r1.shape[1]
        to_grid_h = self.grid_h.to_grid_matrix(h_up.dtype)  # (G, K_h)
        to_grid_y = self.grid_y.to_grid_matrix(h_up.dtype)  # (G, K_Y)
        degree_y = degree_of_coefficient(self.max_ell).to(h_up.device)
        degree_h = degree_of_coefficient(self.lmax_h).to(h_up.device)
        sh = slots.sh_transposed.transpose(1, 2)  # (N, M, K_Y)
        y_grid = torch.matmul(sh * r2[:, :, degree_y], to_grid_y.T)  # (N, M, G)
        k_h = to_grid_h.shape[1]
        h_neighbour = h_up.index_select(0, slots.src_padded).view(n, m, k_h, self.num_channels)
        weighted = (r1[:, :, degree_h] * h_neighbour).view(n, m, k_h * self.num_channels)
        summed = torch.matmul(y_grid.transpose(1, 2), weighted).view(n, self.grid_h.num_points, k_h, self.num_channels)
        summed = (summed * to_grid_h.unsqueeze(-1)).sum(dim=2)  # (N, G, C)
        return self.grid_h.from_grid(summed)

    def forward(self, h, edge_radial, edge_sh, slots: "NeighbourSlots", edge_weights=None):
        """h (N, K_h, C), edge_radial (E, num_radial), edge_sh (E, K_Y) -> A (N, (lmax_a+1)^2, C).
        ``edge_weights`` (E, num_radial_out): the radial MLP's output if already known (radial tables)."""
        h_up = self.linear_up(h)
        c = self.num_channels
        if self.lmax_h == 0:
            per_edge = edge_weights is not None
            weights = edge_weights if per_edge else self.radial(slots.radial_padded)
            weights = weights.unflatten(-1, (self.num_radial_out // c, c))  # (E or N, M, L_Y+1, C)
            a = self.scalar_message(h_up, weights[..., : self.max_ell + 1, :], slots, per_edge=per_edge)
        elif self.channelwise_y_weights:
            weights = self.radial(edge_radial) if edge_weights is None else edge_weights
            weights = weights.view(weights.shape[0], self.num_radial_out // c, c)
            a = self.grid_message(h_up, weights[:, self.max_ell + 1:], weights[:, : self.max_ell + 1], edge_sh,
                                  slots.src, slots.dst)
        else:
            weights = self.radial(slots.radial_padded) if edge_weights is None else slots.pad(edge_weights)
            n_h = (self.lmax_h + 1) * c
            r1 = weights[..., :n_h].reshape(slots.num_nodes, slots.max_neighbours, self.lmax_h + 1, c)
            a = self.shared_y_grid_message(h_up, r1, weights[..., n_h:], slots)
        return self.linear(a) / self.avg_num_neighbors
