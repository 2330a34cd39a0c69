"""FAENet (full 8-frame averaging, package-default sizes) against mace-torch's small-sized MACE (the issue's peer)."""
import os

MODEL = "faenet"
PEER = "mace-torch 0.3.16 MACE small-like (random weights)"
PEER_PYTHON = os.environ.get("MATKIT_MACE_PYTHON")  # mace-torch venv, see model_specs/README.md


def ours_hparams():
    return dict(cutoff=6.0, hidden=128, filters=64, num_interactions=4, num_gaussians=50)


def make_peer_calculator(species):
    from model_specs.gaunt_mace import make_peer_calculator as mace_small

    return mace_small(species)
