"""Names transformers changed between the releases this project supports (see docs/compatibility.md).

The model files carry their own switch for the KV cache's name (`CACHE_NAME`, re-exported here): they are the Hub
bundle and import nothing from the toolkit.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .modeling.modeling_asymoe import CACHE_NAME

__all__ = ["CACHE_NAME", "enable_activation_checkpointing"]


def enable_activation_checkpointing(model: PreTrainedModel, **kwargs) -> None:
    """Activation (gradient) checkpointing under the installed release's name: `activation_checkpointing_enable`
    from transformers 5.23, `gradient_checkpointing_enable` (deprecated there) before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)
