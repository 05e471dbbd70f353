"""Training from Python: ``train(accelerator, data_args, eval_args, training_args, model_overrides)`` is what
``scripts/train.py`` runs (arguments from ``blossomrec_hf.training_args.parse_training_arguments``)."""

from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
