"""blossomrec-hf: the BlossomRec sequential recommender as a Hugging Face model package."""

from .model import (
    BlossomRecConfig,
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
