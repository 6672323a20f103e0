"""AsyMoE configurations (the developer's home of the Hub bundle's `configuration_asymoe.py`)."""

from .configuration_asymoe import AsyMoEConfig, AsyMoETextConfig, ExpertLayout

__all__ = ["AsyMoEConfig", "AsyMoETextConfig", "ExpertLayout"]
