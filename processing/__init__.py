"""AsyMoE processor (the developer's home of the Hub bundle's `processing_asymoe.py`)."""

from .processing_asymoe import DEFAULT_CHAT_TEMPLATE, AsyMoEProcessor

__all__ = ["AsyMoEProcessor", "DEFAULT_CHAT_TEMPLATE"]
