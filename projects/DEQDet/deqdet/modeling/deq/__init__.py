"""DEQDet's deep-equilibrium decoder: solver, refinement-aware gradient and perturbation, gradient stash."""

from .config import add_deqdet_decoder_config
from .decoder import DEQDecoder
from .perturb import RefinementPerturbation
from .solver import solve
from .stash import GradientStash

__all__ = ["add_deqdet_decoder_config", "DEQDecoder", "GradientStash", "RefinementPerturbation", "solve"]
