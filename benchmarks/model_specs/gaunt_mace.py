"""Benchmark spec: Gaunt-MACE vs mace-torch 0.3.16 MACE with the MACE-MP-0 "small" shape (random weights).

Matched sizes: 128 channels, scalar hidden features (MACE 128x0e), edge SH / messages up to l = 3,
correlation 3, 2 interactions, r_max 6 Å, 10 Bessel functions, p = 5, radial MLP [64, 64, 64],
readout MLP 16, avg_num_neighbors 61.96 (the settings of the peer-benchmarks anchor, 3.36 s E+F+S on Si512
single-threaded). The peer is wrapped in mace's own ``MACECalculator`` (which always computes the stress).
"""
import os

MODEL = "gaunt_mace"
PEER = "mace-torch 0.3.16 ScaleShiftMACE, MP-0 small shape (128x0e, max_ell 3, corr 3, 2 layers, 6 Å)"
PEER_PYTHON = os.environ.get("MATKIT_MACE_PYTHON")  # mace-torch venv, see model_specs/README.md

CUTOFF = 6.0
NUM_CHANNELS = 128
MAX_ELL = 3
CORRELATION = 3
NUM_INTERACTIONS = 2
NUM_BESSEL = 10
ENVELOPE_P = 5
RADIAL_MLP = [64, 64, 64]
READOUT_HIDDEN = 16
AVG_NUM_NEIGHBORS = 61.96


def ours_hparams() -> dict:
    return dict(cutoff=CUTOFF, num_channels=NUM_CHANNELS, max_ell=MAX_ELL, hidden_lmax=0,
                correlation=CORRELATION, num_interactions=NUM_INTERACTIONS, num_bessel=NUM_BESSEL,
                envelope_p=ENVELOPE_P, radial_mlp=RADIAL_MLP, readout_hidden=READOUT_HIDDEN,
                avg_num_neighbors=AVG_NUM_NEIGHBORS)


def make_peer_model(species, dtype="float32", hidden_irreps=f"{NUM_CHANNELS}x0e"):
    """A random-weight mace ``ScaleShiftMACE`` of the MP-0 small shape for the atomic numbers ``species``
    (``hidden_irreps="128x0e+128x1o"`` gives the "medium" shape, to compare with ours at ``hidden_lmax=1``)."""
    import mace  # noqa: F401  (import before e3nn: mace sets its torch.load environment)
    import numpy as np
    import torch
    from e3nn import o3
    from mace.modules import ScaleShiftMACE, interaction_classes

    torch.set_default_dtype(getattr(torch, dtype))
    torch.manual_seed(0)
    species = sorted(int(z) for z in species)
    interaction = interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = ScaleShiftMACE(
        r_max=CUTOFF, num_bessel=NUM_BESSEL, num_polynomial_cutoff=ENVELOPE_P, max_ell=MAX_ELL,
        interaction_cls=interaction, interaction_cls_first=interaction, num_interactions=NUM_INTERACTIONS,
        num_elements=len(species), hidden_irreps=o3.Irreps(hidden_irreps),
        MLP_irreps=o3.Irreps(f"{READOUT_HIDDEN}x0e"), atomic_energies=np.zeros(len(species)),
        avg_num_neighbors=AVG_NUM_NEIGHBORS, atomic_numbers=species, correlation=CORRELATION,
        gate=torch.nn.functional.silu, radial_MLP=RADIAL_MLP, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    return model.to(getattr(torch, dtype)).eval()


def make_peer_calculator(species, hidden_irreps=f"{NUM_CHANNELS}x0e"):
    from mace.calculators import MACECalculator

    model = make_peer_model(species, hidden_irreps=hidden_irreps)
    return MACECalculator(models=model, device="cpu", default_dtype="float32")
