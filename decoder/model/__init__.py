"""Mixtral-layout model code: ModelConfig and the Transformer."""

from decoder.model.config import ModelConfig
from decoder.model.transformer import Gating, MoEObserver, TopKGating, Transformer, load_balancing_loss

__all__ = ["ModelConfig", "Transformer", "Gating", "TopKGating", "MoEObserver", "load_balancing_loss"]
