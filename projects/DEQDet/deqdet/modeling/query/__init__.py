"""The query-based detector's parts: xyzr boxes, 3D sampling, adaptive mixing, the AdaMixer stage,
decoders, the channel mapper, initial queries, the Hungarian matcher and the set criterion."""

from .config import add_query_config
from .criterion import SetCriterion
from .decoder import QUERY_DECODER_REGISTRY, AdaMixerDecoder, QueryDecoder, build_query_decoder
from .matcher import HungarianMatcher
from .neck import ChannelMapper
from .query_init import InitialQueries
from .stage import AdaMixerStage, StageOutput

__all__ = [
    "add_query_config",
    "AdaMixerDecoder",
    "AdaMixerStage",
    "ChannelMapper",
    "HungarianMatcher",
    "InitialQueries",
    "QUERY_DECODER_REGISTRY",
    "QueryDecoder",
    "SetCriterion",
    "StageOutput",
    "build_query_decoder",
]
