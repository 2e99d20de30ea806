"""The shipped default model's recipe (``selfrepair train-default-model``); reads tasks, never read by them."""

from ..tasks.heldout import HELDOUT_DIR, HELDOUT_FILES, heldout_text
from .recipe import (SPECIAL, THRESHOLDS, Recipe, evaluate_model, induction_batch, induction_metrics,
                     sinusoidal_positions, stdlib_sources, train_default_model, train_tokenizer, write_model_card)

__all__ = ["Recipe", "train_default_model", "evaluate_model", "write_model_card", "stdlib_sources", "train_tokenizer",
           "sinusoidal_positions", "induction_batch", "induction_metrics", "SPECIAL", "THRESHOLDS", "HELDOUT_DIR",
           "HELDOUT_FILES", "heldout_text"]
