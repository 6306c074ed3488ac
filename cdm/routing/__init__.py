"""Routers: w_i(x_t, t, c) = P(source i | x_t, t, c), the weights of the composition.

    learnt.py   the learnt router (a timestep- and class-conditioned CNN classifier over the sources); its public
                names are re-exported here
    density.py  training-free weights from each compartment's own scores (SuperDiff)
"""

from cdm.routing.learnt import (
    CONFIG,
    NOISE_BINS,
    WEIGHTS,
    Router,
    RouterManifest,
    RouterReport,
    RouterResult,
    load_router,
    save_router,
    train_router,
)

__all__ = [
    "CONFIG",
    "NOISE_BINS",
    "WEIGHTS",
    "Router",
    "RouterManifest",
    "RouterReport",
    "RouterResult",
    "load_router",
    "save_router",
    "train_router",
]
