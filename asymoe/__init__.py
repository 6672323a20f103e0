"""AsyMoE: asymmetric mixture-of-experts for LLaVA-style vision-language models."""

from .configuration import AsyMoEConfig, AsyMoETextConfig
from .modeling import AsyMoEForConditionalGeneration, AsyMoEModel, AsyMoETextModel

__version__ = "0.1.0"

__all__ = [
    "AsyMoEConfig",
    "AsyMoEForConditionalGeneration",
    "AsyMoEModel",
    "AsyMoETextConfig",
    "AsyMoETextModel",
]
