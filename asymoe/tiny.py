"""Tiny AsyMoE models, tokenizers and processors built from configs: the embedded default of the demo and tests.

Nothing here downloads anything: the tokenizer is a word-level `tokenizers` model over a given vocabulary and the
image processor is transformers' PIL CLIP processor.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .configuration import AsyMoEConfig
from .processing import DEFAULT_CHAT_TEMPLATE, AsyMoEProcessor

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_WORDS = ["USER", "ASSISTANT", ":", "system", "?", ".", ","]

# The embedded default: CLIP-style vision tower on 32x32 images, 4-layer decoder, MoE in layers 1 and 3.
TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "num_experts_per_tok": 2,
}


def build_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the special tokens, the chat-template words and `words` (unknown words → <unk>)."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *CHAT_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, moe_variant: str = "asymoe", **text_overrides) -> AsyMoEConfig:
    """Tiny AsyMoE config sized to `tokenizer` (overrides go to the text config)."""
    text = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "moe_variant": moe_variant,
        **text_overrides,
    }
    return AsyMoEConfig(
        vision_config=dict(TINY_VISION),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def _image_processor(size: int) -> CLIPImageProcessorPil:
    """Resize + center-crop to `size`, CLIP normalisation."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_processor(config: AsyMoEConfig, tokenizer: PreTrainedTokenizerFast) -> AsyMoEProcessor:
    """Processor matching `config`'s vision tower."""
    image_processor = _image_processor(config.vision_config.image_size)
    return AsyMoEProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens)


def tiny_llava(
    tokenizer: PreTrainedTokenizerFast, vision: dict | None = None, vision_feature_layer: int = -2, **text_overrides
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The dense counterpart of `tiny_config`: a transformers LLaVA (Llama decoder, CLIP tower of the same sizes,
    randomly initialised) and its `LlavaProcessor` with AsyMoE's LLaVA-1.5 chat template — a source to upcycle.
    `vision` overrides CLIP fields (image and patch size, width, depth); `vision_feature_layer` is the tower layer
    the projector reads (LLaVA's -2 leaves a 2-layer tower's last layer unused)."""
    vision = {key: value for key, value in {**TINY_VISION, **(vision or {})}.items() if key != "model_type"}
    text = {key: value for key, value in TINY_TEXT.items() if key != "num_experts_per_tok"}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**text, **text_overrides},
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
    )
    processor = LlavaProcessor(
        image_processor=_image_processor(vision["image_size"]),
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" feature strategy
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor
