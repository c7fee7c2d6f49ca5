"""Model code: ModelConfig (config.py; family switches read by families.py) and the Transformer
(transformer.py) of every supported MoE family."""

from __future__ import annotations

from typing import Any

__all__ = ["ModelConfig", "Transformer", "Gating", "TopKGating", "MoEObserver", "load_balancing_loss"]


def __getattr__(name: str) -> Any:
    # lazy, so decoder.experts.provider and decoder.model.transformer can import each other's modules
    if name == "ModelConfig":
        from decoder.model.config import ModelConfig
        return ModelConfig
    if name in __all__:
        from decoder.model import transformer
        return getattr(transformer, name)
    raise AttributeError(f"module 'decoder.model' has no attribute {name!r}")
