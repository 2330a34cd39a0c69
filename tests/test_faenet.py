"""FAENet and frame averaging."""
import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111

import matkit
from matkit.graph import atoms_to_graph, edge_vectors, graph_batch_vector
from matkit.models.faenet import period_and_group
from matkit.nn.frame_averaging import compute_frames
from model_harness import ModelHarness, SPECIES, periodic_structure, random_rotation

SMALL = dict(hidden=16, filters=16, num_interactions=2, num_gaussians=12, pg_dim=4, avg_num_neighbors=1.0)


class TestFAENet(ModelHarness):
    model_name = "faenet"
    hparams = SMALL


def test_period_and_group_against_pymatgen():
    from pymatgen.core import Element

    for z in range(1, 119):
        el = Element.from_Z(z)
        period, group = period_and_group(z)
        assert period == el.row or (el.is_lanthanoid or el.is_actinoid), z
        if not (el.is_lanthanoid or el.is_actinoid):
            assert group == el.group, (z, group, el.group)


def _frames(atoms, cutoff=4.0, **kw):
    g = atoms_to_graph(atoms, cutoff, dtype=torch.float64)
    vec = edge_vectors(g.pos, g.cell, g.edge_index, g.shifts, graph_batch_vector(g))
    return compute_frames(g.pos, vec, g.edge_index, graph_batch_vector(g), 1, g.pbc, cutoff, **kw)


@pytest.mark.parametrize("proper", [False, True])
def test_frames_rotate_with_the_structure(proper):
    atoms = periodic_structure(4)
    rot = random_rotation(7)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    turned.cell = atoms.cell.array @ rot.T
    a, b = _frames(atoms, proper_only=proper), _frames(turned, proper_only=proper)
    assert a.num_frames == (4 if proper else 8) and not a.degenerate.any()
    # the frame set is equivariant: {R U_k} == {U'_k} as sets
    rotated = torch.einsum("ij,kbjl->kbil", torch.tensor(rot), a.rotations)
    for k in range(a.num_frames):
        assert min((rotated[k] - b.rotations[m]).abs().max().item() for m in range(b.num_frames)) < 1e-10
    if proper:
        assert torch.allclose(torch.linalg.det(a.rotations), torch.ones(1, dtype=torch.float64))


def test_energy_exactly_invariant_to_rewrapping_and_origin():
    torch.manual_seed(0)
    model = matkit.build("faenet", species=SPECIES, cutoff=4.0, **SMALL).double().eval()
    atoms = periodic_structure(1)
    ref = model(atoms_to_graph(atoms, 4.0, dtype=torch.float64), stress=True)
    moved = atoms.copy()
    moved.positions += [1.7, -0.4, 9.1]
    moved.wrap()
    out = model(atoms_to_graph(moved, 4.0, dtype=torch.float64), stress=True)
    assert abs(out["energy"] - ref["energy"]).item() < 1e-10
    assert (out["forces"] - ref["forces"]).abs().max() < 1e-10


def test_degenerate_structures_are_flagged_and_forces_stay_finite():
    cubic = bulk("Si", "diamond", a=5.43, cubic=True)  # isotropic edge covariance
    assert _frames(cubic, cutoff=4.0).degenerate.all()
    torch.manual_seed(0)
    model = matkit.build("faenet", species=SPECIES, cutoff=4.0, **SMALL).double().eval()
    out = model(atoms_to_graph(cubic, 4.0, dtype=torch.float64), stress=True)
    assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["stress"]).all()


def test_two_dimensional_frames_keep_z():
    slab = fcc111("Al", size=(2, 3, 3), vacuum=5.0)
    slab.rattle(0.1, seed=0)
    frames = _frames(slab, mode="2D")
    assert frames.num_frames == 4
    assert torch.allclose(frames.rotations[..., 2, :], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_stochastic_frames_average_to_full_frame_averaging():
    """One random frame per call (training) is unbiased: its mean over many draws approaches the FA energy,
    and the spread over frames is the measured stochastic-mode variance."""
    torch.manual_seed(0)
    model = matkit.build("faenet", species=SPECIES, cutoff=4.0, **SMALL).double()
    graph = atoms_to_graph(periodic_structure(3), 4.0, dtype=torch.float64)
    model.eval()
    full = model(graph, forces=False)["energy"].item()
    model.train()
    draws = np.array([model(graph, forces=False)["energy"].item() for _ in range(400)])
    per_frame_std = draws.std()
    assert per_frame_std > 0  # single frames really differ
    assert abs(draws.mean() - full) < 4 * per_frame_std / np.sqrt(len(draws))


def test_fused_messages_equal_plain_autograd_ops():
    """The edge-chunked message op used at inference gives the same energy, forces and stress as the plain
    autograd ops used in training (float64), with chunks smaller than the edge list."""
    from matkit.models import faenet as faenet_module

    torch.manual_seed(0)
    model = matkit.build("faenet", species=SPECIES, cutoff=4.0, **SMALL).double().eval()
    model.scale.fill_(1000.0)  # random weights give tiny forces; scale them to O(0.1) eV/Å
    graph = atoms_to_graph(periodic_structure(5), 4.0, dtype=torch.float64)
    chunk = faenet_module._edge_chunk
    faenet_module._edge_chunk = lambda channels: 16
    try:
        fused = model(graph, forces=True, stress=True)
    finally:
        faenet_module._edge_chunk = chunk
    for layer in model.interactions:
        layer.train()  # plain path; the frames stay the deterministic full set (model itself in eval mode)
    plain = model(graph, forces=True, stress=True)
    assert graph.edge_index.shape[1] > 3 * 16  # several chunks of 16 edges
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(fused[key].detach().numpy(), plain[key].detach().numpy(), rtol=1e-12, atol=1e-12)
    assert plain["forces"].abs().max() > 1e-3  # not trivially zero


def test_fused_messages_gradcheck():
    from matkit.models.faenet import _FilteredMessages

    torch.manual_seed(1)
    k, n, e, f, fe = 2, 5, 11, 3, 4
    x = torch.randn(k, n, f, dtype=torch.float64, requires_grad=True)
    edge_feat = torch.randn(k, e, fe, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(f, fe, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(f, dtype=torch.float64, requires_grad=True)
    env = torch.rand(e, dtype=torch.float64, requires_grad=True)
    src, dst = torch.randint(n, (e,)), torch.randint(n, (e,))
    assert torch.autograd.gradcheck(lambda *a: _FilteredMessages.apply(*a, src, dst), (x, edge_feat, weight, bias, env))


def test_fused_messages_are_thread_safe():
    """Two threads evaluating FAENet at once get the same forces as one thread (scratch buffers are per thread)."""
    import threading

    torch.manual_seed(0)
    model = matkit.build("faenet", species=SPECIES, cutoff=4.0, **SMALL).double().eval()
    model.scale.fill_(1000.0)
    graphs = [atoms_to_graph(periodic_structure(seed), 4.0, dtype=torch.float64) for seed in (5, 6)]
    expected = [model(g)["forces"] for g in graphs]
    results = {}

    def work(k):
        for _ in range(4):
            results.setdefault(k, []).append(model(graphs[k])["forces"])

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        for forces in results[k]:
            torch.testing.assert_close(forces, expected[k], rtol=0, atol=1e-12)
