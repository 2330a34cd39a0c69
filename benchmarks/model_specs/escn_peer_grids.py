"""Benchmark spec: matkit eSCN on fairchem's S^2 grid resolutions vs fairchem-core 1.10.0's eSCN (same peer as
``escn.py``).

matkit's default grids are chosen for equivariance to ~1e-11 (``matkit.models.escn.default_grids``): at lmax 2,
mmax 1 the node grid is 10 x 20 = 200 points and the edge grid 4 x 8 = 32. fairchem's ``SO3_Grid`` uses
``2 (lmax + 1)`` latitudes and ``2 mmax + 1`` longitudes (``2 (lmax + 1) + 1`` when mmax = lmax): 6 x 7 = 42 node
points and 6 x 3 = 18 edge points, so it does ~5x less node-grid work and aliases more. This spec runs ours on
fairchem's grids, to separate the cost of the grids from the cost of the implementation.
"""
from .escn import HPARAMS, MODEL, PEER_PYTHON, make_peer_calculator  # noqa: F401

PEER = "fairchem-core 1.10.0 eSCN (as escn.py); ours on fairchem's grids: node 6x7, edge 6x3"


def ours_hparams() -> dict:
    lmax, mmax = HPARAMS["lmax"], HPARAMS["mmax"]
    return dict(HPARAMS, node_grid=(2 * (lmax + 1), 2 * (lmax + 1) + 1), edge_grid=(2 * (lmax + 1), 2 * mmax + 1))
