"""The files a checkpoint carries as remote code: configuration, modeling and the attention modules they import."""

from .configuration_blossomrec import BlossomRecConfig
from .modeling_blossomrec import (
    BlossomRecForSequentialRecommendation,
    BlossomRecModel,
    RecommendationOutput,
    SequentialRecommenderOutput,
)

__all__ = [
    "BlossomRecConfig",
    "BlossomRecForSequentialRecommendation",
    "BlossomRecModel",
    "RecommendationOutput",
    "SequentialRecommenderOutput",
]
