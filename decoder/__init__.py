"""Decoder: Mixtral-family model with an AdapMoE expert cache, prefetcher and adaptive gating."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Engine", "GenerationResult", "ModelConfig", "Transformer"]

if TYPE_CHECKING:  # pragma: no cover
    from decoder.engine import Engine, GenerationResult
    from decoder.model import ModelConfig, Transformer


def __getattr__(name: str) -> Any:
    # lazy: `import decoder.cli` stays fast and torch loads only when an engine is needed
    if name in ("Engine", "GenerationResult"):
        from decoder import engine
        return getattr(engine, name)
    if name in ("ModelConfig", "Transformer"):
        from decoder import model
        return getattr(model, name)
    raise AttributeError(f"module 'decoder' has no attribute {name!r}")
