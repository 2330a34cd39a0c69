"""Benchmark spec: matkit eSCN vs fairchem-core 1.10.0's eSCN (the last fairchem release with eSCN), random weights.

Matched shape (matkit's defaults, the bundled potentials' shape): 2 layers, lmax 2, mmax 1, 32 sphere / hidden /
edge channels, Gaussian distance features, cutoff 5 Å. Both sides give conservative forces (autograd of the
energy): fairchem's eSCN runs with ``regress_forces=False`` and the benchmark's ASE wrapper takes ``-dE/dr``
(fairchem's own direct-force head is a different, non-conservative model). fairchem builds its periodic graph on
the fly (``otf_graph=True``), with ``max_neighbors`` raised to 200 so that it keeps every pair within the cutoff,
as matkit does; it has no stress here (EF only).

The peer venv: fairchem-core 1.10.0 pins torch 2.4; it runs on torch 2.13 installed with ``--no-deps`` plus
torch_scatter built from source (see ``model_specs/README.md``).
"""
import os

MODEL = "escn"
PEER = "fairchem-core 1.10.0 eSCN (lmax 2, mmax 1, 32 channels, 2 layers, 5 Å), conservative forces"
PEER_PYTHON = os.environ.get("MATKIT_FAIRCHEM_PYTHON")

HPARAMS = dict(cutoff=5.0, num_layers=2, lmax=2, mmax=1, sphere_channels=32, hidden_channels=32, edge_channels=32)


def ours_hparams() -> dict:
    return dict(HPARAMS)


def make_peer_calculator(species):
    import numpy as np
    import torch
    from ase.calculators.calculator import Calculator, all_changes
    from fairchem.core.models.escn.escn import eSCN
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    model = eSCN(use_pbc=True, regress_forces=False, otf_graph=True, max_neighbors=200, cutoff=HPARAMS["cutoff"],
                 num_layers=HPARAMS["num_layers"], lmax_list=[HPARAMS["lmax"]], mmax_list=[HPARAMS["mmax"]],
                 sphere_channels=HPARAMS["sphere_channels"], hidden_channels=HPARAMS["hidden_channels"],
                 edge_channels=HPARAMS["edge_channels"]).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    class FairchemESCN(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            pos = torch.tensor(self.atoms.positions, dtype=torch.float32, requires_grad=True)
            data = Data(pos=pos, atomic_numbers=torch.tensor(self.atoms.numbers),
                        cell=torch.tensor(np.asarray(self.atoms.cell), dtype=torch.float32).view(1, 3, 3),
                        natoms=torch.tensor([len(self.atoms)]), pbc=torch.tensor([[True, True, True]]))
            batch = Batch.from_data_list([data])
            with torch.enable_grad():
                energy = model(batch)["energy"].sum()
                (grad,) = torch.autograd.grad(energy, batch.pos)
            self.results["energy"] = float(energy)
            self.results["forces"] = -grad.detach().numpy().astype(np.float64)

    return FairchemESCN()
