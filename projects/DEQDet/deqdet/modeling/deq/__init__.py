"""DEQDet's deep-equilibrium decoder: the decoder, its training schedule (refinement-aware gradient and
perturbation, gradient stash) and its inference (fixed-point solver, compiled stage, CUDA graphs)."""

from .config import add_deqdet_decoder_config
from .decoder import DEQDecoder
from .inference import InferenceSolver
from .perturb import RefinementPerturbation
from .solver import solve
from .stash import GradientStash
from .training import TrainingSchedule

__all__ = [
    "add_deqdet_decoder_config",
    "DEQDecoder",
    "GradientStash",
    "InferenceSolver",
    "RefinementPerturbation",
    "TrainingSchedule",
    "solve",
]
