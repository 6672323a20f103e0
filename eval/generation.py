"""Prompting and decoding shared by `asymoe eval` and the lmms-eval model: chat-template user turns with one image
placeholder per image, processor inputs on the model's device, batched generation with left padding."""

from __future__ import annotations

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
                   **generate_kwargs) -> list[str]:
    """Answers to `prompts` (`generate_tokens`, then `decode_answers`)."""
    return decode_answers(processor, *generate_tokens(model, processor, prompts, images, max_new_tokens,
                                                      **generate_kwargs))
