"""TensorNet: shared harness (O(3) and SO(3)), torchmd-net equivalence on a stored fixture, model specifics."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

import matkit
from matkit.convert.torchmdnet import tensornet_from_torchmdnet_state
from matkit.graph import atoms_to_graph
from model_harness import DTYPES, ModelHarness, periodic_structure


class TestTensorNet(ModelHarness):
    model_name = "tensornet"
    hparams = dict(hidden_channels=16, num_layers=2, num_rbf=8)


class TestTensorNetMatglVariant(ModelHarness):
    """matgl's TensorNet options (MatPES universal potentials): smooth Bessel basis, no self-loops, gated readout."""

    model_name = "tensornet"
    hparams = dict(hidden_channels=16, num_layers=2, num_rbf=3, radial_basis="smooth_bessel", self_loops=False,
                   readout="gated")


def test_smooth_bessel_basis_is_orthonormal_and_vanishes_smoothly_at_the_cutoff():
    """Kocer et al.'s basis: orthonormal on [0, rc] with weight r^2 (trapezoid quadrature), zero value and slope
    at rc, finite at r = 0."""
    from matkit.nn.radial import SmoothBesselBasis

    basis = SmoothBesselBasis(5.0, 4)
    r = torch.linspace(0.0, 5.0, 100001, dtype=torch.float64)
    g = basis(r)
    gram = torch.trapezoid(g[:, :, None] * g[:, None, :] * (r ** 2)[:, None, None], r, dim=0)
    np.testing.assert_allclose(gram.numpy(), np.eye(4), atol=1e-8)
    assert torch.isfinite(g[0]).all() and g[0].abs().max() > 0.1
    edge = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    values = basis(edge)[0]
    slopes = [torch.autograd.grad(values[k], edge, retain_graph=True)[0].item() for k in range(4)]
    assert values.abs().max() < 1e-14 and max(abs(x) for x in slopes) < 1e-12
    # the float64 constants survive a float32 round trip of the module
    again = SmoothBesselBasis(5.0, 4).to(torch.float32).to(torch.float64)
    assert torch.equal(again(r[:50]), g[:50])


def test_matgl_variant_options_are_checked():
    for bad, message in ((dict(radial_basis="gaussian"), "radial_basis"), (dict(readout="set2set"), "readout"),
                         (dict(radial_basis="smooth_bessel", cutoff_lower=0.5), "cutoff_lower"),
                         (dict(readout="gated", output_hidden_layers=1), "output_hidden_layers")):
        with pytest.raises(ValueError, match=message):
            matkit.build("tensornet", species=[1, 6], cutoff=5.0, **bad)


class TestTensorNetSO3(ModelHarness):
    """SO(3) variant: invariant under proper rotations only (plain product Y M mixes parities)."""

    model_name = "tensornet"
    hparams = dict(hidden_channels=16, num_layers=2, num_rbf=8, group="SO(3)")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("reflect", [False])
    def test_rotation_and_reflection(self, dtype, reflect):
        super().test_rotation_and_reflection(dtype, reflect)

    def test_reflection_changes_energy(self):
        """The SO(3) model is chiral: a mirror image has a different energy (the O(3) one does not)."""
        atoms = periodic_structure(seed=4)
        mirrored = atoms.copy()
        mirrored.positions[:, 0] *= -1
        mirrored.cell = atoms.cell.array * np.array([-1.0, 1.0, 1.0])
        energies = {}
        for group in ("SO(3)", "O(3)"):
            torch.manual_seed(0)
            model = matkit.build("tensornet", species=[1, 6, 8, 14], cutoff=self.cutoff, group=group,
                                 **{k: v for k, v in self.hparams.items() if k != "group"}).double()
            energies[group] = [self.evaluate(model, a, torch.float64)["energy"][0] for a in (atoms, mirrored)]
        so3, o3 = energies["SO(3)"], energies["O(3)"]
        assert abs(o3[0] - o3[1]) < 1e-10 * max(1.0, abs(o3[0]))
        # random weights give a small chirality (~4e-7 eV here), far above the float64 noise floor (<1e-12)
        assert abs(so3[0] - so3[1]) > 1e-8 * max(1.0, abs(so3[0]))


# ---- torchmd-net equivalence ----------------------------------------------------------------------------------
FIXTURE = Path(__file__).parent / "data" / "tensornet_torchmdnet.pt"


def _fixture():
    """Small random torchmd-net 3.1.0 TensorNet (8 channels, 2 layers, 6 rbf, 4.5 Å, max_z 16, std 1.7) and its
    float64 energies / forces (pure-PyTorch ops) on Si64, SiCO64 (periodic) and ethanol, written by
    ``benchmarks/tensornet_vs_torchmdnet.py --small --fixture``."""
    return torch.load(FIXTURE, weights_only=True)


def _evaluate_structures(model, data, dtype=torch.float64):
    for s in data["structures"]:
        atoms = Atoms(numbers=s["numbers"].numpy(), positions=s["positions"].numpy(), cell=s["cell"].numpy(),
                      pbc=s["pbc"].numpy())
        out = model(atoms_to_graph(atoms, model.cutoff, dtype=dtype), forces=True)
        yield s["name"], float(out["energy"][0].detach()), out["forces"].detach().double().numpy()


def test_converted_torchmdnet_fixture_matches():
    """Converted weights reproduce torchmd-net's float64 energies and forces to round-off."""
    data = _fixture()
    model = tensornet_from_torchmdnet_state(data["state_dict"], data["hyper_parameters"], species=data["species"])
    assert model.scale.item() == pytest.approx(1.7)
    for name, energy, forces in _evaluate_structures(model, data):
        ref_e, ref_f = float(data["energy"][name]), data["forces"][name].numpy()
        assert abs(energy - ref_e) < 1e-12 * abs(ref_e), name
        np.testing.assert_allclose(forces, ref_f, rtol=0, atol=1e-12 * np.abs(ref_f).max())


def test_converter_species_subset_and_errors():
    data = _fixture()
    sd, hp = dict(data["state_dict"]), data["hyper_parameters"]
    # species order is free: a permuted species list gives the same energies
    a = tensornet_from_torchmdnet_state(sd, hp, species=[14, 8, 6, 1])
    b = tensornet_from_torchmdnet_state(sd, hp, species=[1, 6, 8, 14])
    ea = [e for _, e, _ in _evaluate_structures(a, data)]
    eb = [e for _, e, _ in _evaluate_structures(b, data)]
    np.testing.assert_allclose(ea, eb, rtol=1e-13)
    with pytest.raises(ValueError, match="max_z"):
        tensornet_from_torchmdnet_state(sd, hp, species=[1, 79])
    with pytest.raises(ValueError, match="mean"):
        tensornet_from_torchmdnet_state(dict(sd, **{"model.mean": torch.tensor(1.0, dtype=torch.float64)}), hp,
                                        species=[1, 14])
    with pytest.raises(ValueError, match="model='graph-network'"):
        tensornet_from_torchmdnet_state(sd, dict(hp, model="graph-network"), species=[1, 14])


def test_matches_torchmdnet():
    """Direct comparison with a live torchmd-net in this interpreter (float64, pure-PyTorch and warp ops)."""
    pytest.importorskip("torchmdnet", reason="torchmd-net is not installed in this interpreter; it lives in its own "
                                              "venv: run benchmarks/tensornet_vs_torchmdnet.py (the stored fixture "
                                              "test above covers CI)")
    from torchmdnet.models.model import create_model

    data = _fixture()
    hp = dict(data["hyper_parameters"])
    reference = create_model(dict(hp, precision=64)).double().eval()
    reference.load_state_dict({k[len("model."):]: v for k, v in data["state_dict"].items()})
    ours = tensornet_from_torchmdnet_state(data["state_dict"], hp, species=data["species"])
    for (name, energy, forces), s in zip(_evaluate_structures(ours, data), data["structures"]):
        z = s["numbers"].long()
        box = s["cell"] if bool(s["pbc"].any()) else None
        ref_e, ref_neg_dy = reference(z, s["positions"].clone(), batch=torch.zeros_like(z), box=box)
        # torchmd-net's warp kernels agree with its own pure-PyTorch ops to ~1e-8 relative in float64
        assert abs(energy - float(ref_e)) < 1e-6 * abs(float(ref_e)), name
        np.testing.assert_allclose(forces, ref_neg_dy.detach().numpy(), rtol=0,
                                   atol=1e-5 * float(ref_neg_dy.abs().max()))


def test_fused_messages_match_autograd_path_and_training_double_backward():
    """Inference uses chunked fused message kernels; training mode uses plain autograd ops. Same numbers, and
    the training path supports a force loss (double backward)."""
    torch.manual_seed(1)
    model = matkit.build("tensornet", species=[1, 6, 8, 14], cutoff=4.0, hidden_channels=8, num_rbf=6).double()
    graph = atoms_to_graph(periodic_structure(seed=3), model.cutoff, dtype=torch.float64)
    fused = model.eval()(graph, forces=True, stress=True)
    plain = model.train()(graph, forces=True, stress=True, training=True)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(fused[key].detach().numpy(), plain[key].detach().numpy(), rtol=0, atol=1e-12)
    loss = (plain["forces"] ** 2).sum() + plain["stress"].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in model.layers[0].parameters()) > 0


# ---- building blocks -------------------------------------------------------------------------------------------
def _random_messages_inputs(seed=0, num_nodes=7, num_edges=40, channels=5, dtype=torch.float64):
    """Random Y, per-group factors, geometry, pair table and an edge list with reverse-pair groups."""
    from matkit.nn.tensornet_blocks import reverse_pair_groups

    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges // 2,), generator=g)
    dst = torch.randint(0, num_nodes, (num_edges // 2,), generator=g)
    shifts = torch.randint(-1, 2, (num_edges // 2, 3), generator=g).to(dtype)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    shifts = torch.cat([shifts, -shifts])
    _, group = reverse_pair_groups(edge_index, shifts, num_nodes)
    num_groups = int(group.max()) + 1
    return dict(Y=torch.randn(9, num_nodes, channels, generator=g, dtype=dtype),
                factors=torch.randn(num_groups, 3, channels, generator=g, dtype=dtype),
                geometry=torch.randn(9, edge_index.shape[1], generator=g, dtype=dtype),
                pair=torch.randn(3, channels, generator=g, dtype=dtype),
                pair_index=torch.randint(0, 3, (edge_index.shape[1],), generator=g),
                src=edge_index[0], dst=edge_index[1], group=group, num_nodes=num_nodes)


@pytest.mark.parametrize("op", ["neighbour", "geometric"])
def test_message_kernels_agree_with_plain_ops_and_chunked_torch_ops(op):
    """The three implementations of each edge sum (plain autograd ops for training, Numba kernels for CPU
    inference, chunked torch ops for inference on other devices) give the same values and gradients."""
    from matkit.nn import tensornet_blocks as tb

    d = _random_messages_inputs()
    n = d["num_nodes"]
    if op == "neighbour":
        inputs = [d["Y"], d["factors"]]
        impls = {
            "plain": lambda Y, f: tb.neighbour_messages(Y, f, d["src"], d["dst"], n, group=d["group"], fused=False),
            "numba": lambda Y, f: tb._CompiledNeighbourMessages.apply(Y, f, d["src"], d["dst"], d["group"], n),
            "torch": lambda Y, f: tb._NeighbourMessages.apply(Y, f, d["src"], d["dst"], d["group"], n),
        }
    else:
        inputs = [d["geometry"], d["factors"], d["pair"]]
        args = (d["group"], d["pair_index"], d["dst"], n)
        impls = {
            "plain": lambda g, r, p: tb.geometric_messages(g, r, p, *args[:3], n, fused=False),
            "numba": lambda g, r, p: tb._CompiledGeometricMessages.apply(g, r, p, *args),
            "torch": lambda g, r, p: tb._GeometricMessages.apply(g, r, p, *args),
        }
    weight = torch.randn(9, n, d["Y"].shape[2], dtype=torch.float64)
    results = {}
    for name, fn in impls.items():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        results[name] = [out] + list(torch.autograd.grad((out * weight).sum(), leaves))
    assert float(results["plain"][0].detach().abs().max()) > 1.0
    for name in ("numba", "torch"):
        for a, b in zip(results[name], results["plain"]):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0, atol=1e-12)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(impls["numba"], leaves)


def test_message_kernels_float32_and_empty_graph():
    from matkit.nn import tensornet_blocks as tb

    d = _random_messages_inputs(dtype=torch.float32)
    n = d["num_nodes"]
    numba_out = tb._CompiledNeighbourMessages.apply(d["Y"], d["factors"], d["src"], d["dst"], d["group"], n)
    plain = tb.neighbour_messages(d["Y"], d["factors"], d["src"], d["dst"], n, group=d["group"], fused=False)
    assert numba_out.dtype == torch.float32
    np.testing.assert_allclose(numba_out.numpy(), plain.numpy(), rtol=1e-5, atol=1e-5)
    none = torch.zeros(0, dtype=torch.long)
    empty = tb.neighbour_messages(d["Y"], d["factors"][:0], none, none, n, group=none, fused=True)
    assert empty.shape == (9, n, d["Y"].shape[2]) and not empty.any()


def test_layout_maps_match_explicit_matrix_algebra():
    """compose / decompose / norms / per-channel products against plain 3x3 matrices built by hand."""
    from matkit.nn import tensornet_blocks as tb

    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 4, 3, generator=g, dtype=torch.float64)
    i, ax, ay, az, sxx, syy, sxy, sxz, syz = X
    M = torch.stack([torch.stack([i + sxx, sxy - az, sxz + ay]),
                     torch.stack([sxy + az, i + syy, syz - ax]),
                     torch.stack([sxz - ay, syz + ax, i - sxx - syy])])           # (3, 3, 4, 3)
    np.testing.assert_allclose(tb.compose_matrix(X).numpy(), M.numpy(), rtol=0, atol=1e-14)
    full = torch.randn(3, 3, 4, 3, generator=g, dtype=torch.float64)
    parts = tb.decompose_matrix(full)
    np.testing.assert_allclose(tb.compose_matrix(parts).numpy(), full.numpy(), rtol=0, atol=1e-14)
    sym = 0.5 * (full + full.transpose(0, 1))
    trace = torch.einsum("iinf->nf", full)
    np.testing.assert_allclose(parts[0].numpy(), (trace / 3).numpy(), rtol=0, atol=1e-14)
    S = sym - torch.eye(3, dtype=torch.float64)[:, :, None, None] * trace / 3
    A = 0.5 * (full - full.transpose(0, 1))
    expected_norms = torch.stack([3 * (trace / 3) ** 2, (A ** 2).sum((0, 1)), (S ** 2).sum((0, 1))])
    np.testing.assert_allclose(tb.squared_norms(parts).numpy(), expected_norms.numpy(), rtol=1e-13)
    np.testing.assert_allclose(tb.total_squared_norm(parts).numpy(), (full ** 2).sum((0, 1)).numpy(), rtol=1e-13)
    other = torch.randn(3, 3, 4, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(tb.matmul_per_channel(full, other).numpy(),
                               torch.einsum("ijnf,jknf->iknf", full, other).numpy(), rtol=0, atol=1e-13)


def test_message_kernels_propagate_nan():
    """The kernels are compiled without no-NaN assumptions: a NaN input feature reaches the output."""
    from matkit.nn import tensornet_blocks as tb

    d = _random_messages_inputs()
    Y = d["Y"].clone()
    Y[0, d["src"][0], 0] = float("nan")
    out = tb._CompiledNeighbourMessages.apply(Y, d["factors"], d["src"], d["dst"], d["group"], d["num_nodes"])
    assert torch.isnan(out[0, d["dst"][0], 0])
    geometry = d["geometry"].clone()
    geometry[0, 0] = float("nan")
    out = tb._CompiledGeometricMessages.apply(geometry, d["factors"], d["pair"], d["group"], d["pair_index"],
                                              d["dst"], d["num_nodes"])
    assert torch.isnan(out[0, d["dst"][0]]).all()
