"""Lennard-Jones (analytic) against ASE's own LennardJones calculator."""
MODEL = "lj"
PEER = "ase.calculators.lj.LennardJones"
PEER_PYTHON = None


def ours_hparams():
    return dict(sigma=2.0, epsilon=0.1, rc=5.0, smooth=True)


def make_peer_calculator(species):
    from ase.calculators.lj import LennardJones

    return LennardJones(sigma=2.0, epsilon=0.1, rc=5.0, smooth=True)
