"""Training objectives: DDPM (DiT) and the linear interpolant (SiT), both with ReDi's joint loss."""

from __future__ import annotations

from .ddpm import GaussianDiffusion
from .interpolant import LinearInterpolant
from .objective import REP_DROPOUT_MODES, JointObjective

OBJECTIVES = {"ddpm": GaussianDiffusion, "interpolant": LinearInterpolant}


def build_objective(name: str, **kwargs) -> JointObjective:
    """'ddpm' (DiT: epsilon, learned sigma) or 'interpolant' (SiT: velocity); kwargs go to it."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = ["GaussianDiffusion", "JointObjective", "LinearInterpolant", "OBJECTIVES",
           "REP_DROPOUT_MODES", "build_objective"]
