"""Benchmark spec: Gaunt-MACE with l = 1 hidden features vs mace-torch 0.3.16 MACE with the MACE-MP-0 "medium" shape
(hidden irreps 128x0e + 128x1o); everything else as in ``gaunt_mace.py`` (random weights)."""
from .gaunt_mace import MODEL, NUM_CHANNELS, PEER_PYTHON, ours_hparams as _small  # noqa: F401
from .gaunt_mace import make_peer_calculator as _peer

PEER = "mace-torch 0.3.16 ScaleShiftMACE, MP-0 medium shape (128x0e+128x1o, max_ell 3, corr 3, 2 layers, 6 Å)"


def ours_hparams() -> dict:
    return dict(_small(), hidden_lmax=1)


def make_peer_calculator(species):
    return _peer(species, hidden_irreps=f"{NUM_CHANNELS}x0e+{NUM_CHANNELS}x1o")
