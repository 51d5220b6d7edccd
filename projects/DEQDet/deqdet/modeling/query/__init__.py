"""The query-based detector's parts: xyzr boxes, 3D sampling, adaptive mixing, the AdaMixer stage,
decoders, the channel mapper, initial queries, the Hungarian matcher and the set criterion."""

from .config import add_query_config
from .criterion import SetCriterion
from .decoder import QUERY_DECODER_REGISTRY, AdaMixerDecoder, build_query_decoder
from .matcher import HungarianMatcher
from .neck import ChannelMapper
from .query_init import InitialQueries
from .stage import AdaMixerStage

__all__ = [
    "add_query_config",
    "AdaMixerDecoder",
    "AdaMixerStage",
    "ChannelMapper",
    "HungarianMatcher",
    "InitialQueries",
    "QUERY_DECODER_REGISTRY",
    "SetCriterion",
    "build_query_decoder",
]
