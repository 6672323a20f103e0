"""AsyMoE models (the developer's home of the Hub bundle's `modeling_asymoe.py` and `hyperbolic_asymoe.py`)."""

from .modeling_asymoe import (
    AsyMoEForConditionalGeneration,
    AsyMoEModel,
    AsyMoEPreTrainedModel,
    AsyMoETextModel,
)

__all__ = ["AsyMoEForConditionalGeneration", "AsyMoEModel", "AsyMoEPreTrainedModel", "AsyMoETextModel"]
