"""blossomrec-hf: the BlossomRec sequential recommender as a Hugging Face model package.

The model classes are imported on first use, so that the data, evaluation and Hub tools start without loading
torch and transformers.
"""

import importlib

_MODEL_EXPORTS = (
    "BlossomRecConfig",
    "BlossomRecForSequentialRecommendation",
    "BlossomRecModel",
    "RecommendationOutput",
    "SequentialRecommenderOutput",
)

__all__ = list(_MODEL_EXPORTS)


def __getattr__(name):
    if name in _MODEL_EXPORTS:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
