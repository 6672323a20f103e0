"""AsyMoE: asymmetric mixture-of-experts for LLaVA-style vision-language models.

Importing the package registers the AsyMoE classes with transformers' Auto classes, so that saved checkpoints load
here without `trust_remote_code` (elsewhere they load from their bundled remote code).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration import AsyMoEConfig, AsyMoETextConfig
from .modeling import AsyMoEForConditionalGeneration, AsyMoEModel, AsyMoETextModel
from .processing import AsyMoEProcessor

__version__ = "0.1.0"

AutoConfig.register(AsyMoEConfig.model_type, AsyMoEConfig, exist_ok=True)
AutoConfig.register(AsyMoETextConfig.model_type, AsyMoETextConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(AsyMoEConfig, AsyMoEForConditionalGeneration, exist_ok=True)
AutoModel.register(AsyMoETextConfig, AsyMoETextModel, exist_ok=True)
AutoProcessor.register(AsyMoEConfig, AsyMoEProcessor, exist_ok=True)

__all__ = [
    "AsyMoEConfig",
    "AsyMoEForConditionalGeneration",
    "AsyMoEModel",
    "AsyMoEProcessor",
    "AsyMoETextConfig",
    "AsyMoETextModel",
]
