"""Prompting and decoding shared by `asymoe eval` and the lmms-eval model: chat-template user turns with one image
placeholder per image, processor inputs on the model's device, batched generation with left padding."""

from __future__ import annotations

import sys

import torch


def _tokenizer(processor):
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(processor).__name__} has no tokenizer: evaluation needs a multimodal processor "
                         "(image processor + tokenizer + chat template).")
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template: save one with the processor (chat_template.jinja).")
    return tokenizer


def chat_prompts(processor, prompts: list[str], images: list[list]) -> list[str]:
    """Each prompt as a user turn (an image placeholder per image in `images[i]`, then the text) in the processor's
    chat template, ending where the assistant's answer starts."""
    _tokenizer(processor)
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(pictures) + [{"type": "text", "text": prompt}]}],
        add_generation_prompt=True) for prompt, pictures in zip(prompts, images)]


def model_inputs(model, processor, texts: list[str], images: list[list]):
    """Processor inputs for `texts` and their images (the same count for each text; none allowed), padded, on the
    model's device, pixel values in its dtype."""
    inputs = processor(images=images if any(images) else None, text=texts, padding=True, return_tensors="pt")
    inputs = inputs.to(next(model.parameters()).device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.no_grad()
def generate_tokens(model, processor, prompts: list[str], images: list[list], max_new_tokens: int = 16,
                    **generate_kwargs):
    """(inputs, output ids) of generation for `prompts` (`images[i]` shown with `prompts[i]`), left-padded; greedy
    unless `generate_kwargs` say otherwise."""
    tokenizer = _tokenizer(processor)
    tokenizer.padding_side = "left"
    inputs = model_inputs(model, processor, chat_prompts(processor, prompts, images), images)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            **{"do_sample": False, **generate_kwargs})
    return inputs, output


def decode_answers(processor, inputs, output) -> list[str]:
    """The new tokens of each row of `output`, decoded and stripped."""
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_batch(model, processor, prompts: list[str], images: list[list], max_new_tokens: int = 16,
                   check_cache: bool = False, **generate_kwargs) -> list[str]:
    """Answers to `prompts` (`generate_tokens`, then `decode_answers`); with `check_cache` (greedy decoding), also
    decoded without the KV cache first (`check_cached_generation`)."""
    inputs, output = generate_tokens(model, processor, prompts, images, max_new_tokens, **generate_kwargs)
    if check_cache:
        check_cached_generation(model, inputs, output, max_new_tokens, processor.tokenizer.pad_token_id)
    return decode_answers(processor, inputs, output)


# How far apart two tokens' logits may be for a cached and an uncached run to pick differently without an error:
# numerics differ between the two paths, so near-ties may flip; a broken cache flips tokens by far more.
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


class CachedGenerationMismatch(RuntimeError):
    """Greedy generation with the KV cache differs from generation without it: the model's code and the installed
    transformers disagree about the cache, and every cached answer would be wrong."""


def check_cached_generation(model, inputs, cached: torch.Tensor, max_new_tokens: int, pad_token_id) -> None:
    """Raise `CachedGenerationMismatch` unless uncached greedy decoding of `inputs` gives `cached`, up to near-ties
    (where the two first part, the uncached logits of the two tokens lie within `TIE_TOLERANCE`)."""
    uncached = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                              use_cache=False, output_logits=True, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    length = min(cached.shape[1], uncached.sequences.shape[1])
    for row in range(cached.shape[0]):
        differs = (cached[row, :length] != uncached.sequences[row, :length]).nonzero()
        if differs.numel() == 0:
            continue
        step = int(differs[0]) - prompt_length
        logits = uncached.logits[step][row].float()
        gap = float(logits[uncached.sequences[row, prompt_length + step]] - logits[cached[row, prompt_length + step]])
        if gap > TIE_TOLERANCE.get(model.dtype, 1e-3):
            raise CachedGenerationMismatch(
                f"Greedy answers with the KV cache differ from answers without it (row {row}, generated token {step}: "
                f"logit gap {gap:.3g}), so cached answers would be wrong. The model's code does not handle "
                f"transformers {sys.modules['transformers'].__version__} correctly (transformers 5.24 renamed the "
                "cache argument, for example). Install a transformers release the checkpoint was tested on "
                "(config.json: `tested_transformers`) or update the model's code."
            )

