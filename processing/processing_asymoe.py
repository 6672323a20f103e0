"""AsyMoE processor: image processor + tokenizer + chat template; expands each `<image>` to the image's features.

This file is part of the Hub bundle: it imports only transformers and its bundle siblings.
"""

from __future__ import annotations

import bisect

from pathlib import Path

from transformers import BatchFeature, ProcessorMixin

from ..configuration.configuration_asymoe import write_remote_code

# LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT: ...</s>"); assistant replies sit in
# {% generation %} blocks so that TRL's `assistant_only_loss=True` trains on them only.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class AsyMoEProcessor(ProcessorMixin):
    r"""Turns images and text into AsyMoE inputs.

    Args:
        image_processor: any transformers image processor producing the vision tower's `pixel_values`.
        tokenizer: the decoder's tokenizer; must know `image_token` as a single token.
        num_image_tokens (`int`): features one image gives (`AsyMoEConfig.num_image_tokens`); each `<image>` in the
            text becomes that many image tokens.
        image_token (`str`): the placeholder, `"<image>"` by default.
        chat_template (`str`, *optional*): Jinja template; default LLaVA-1.5 style with `{% generation %}` blocks.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        chat_template: str | None = None,
        **kwargs,
    ):
        if num_image_tokens is None or num_image_tokens < 1:
            raise ValueError(
                "AsyMoEProcessor needs num_image_tokens >= 1: pass model.config.num_image_tokens (the features one "
                "image gives)."
            )
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if tokenizer is not None and (image_token_id is None or image_token_id == tokenizer.unk_token_id):
            raise ValueError(
                f"The tokenizer does not know the image token {image_token!r}: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) and resize the "
                "model's embeddings."
            )
        self.image_token_id = image_token_id
        self.auto_map = {"AutoProcessor": "processing_asymoe.AsyMoEProcessor"}
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    def __call__(self, images=None, text=None, return_mm_token_type_ids: bool = False, **kwargs) -> BatchFeature:
        """Tokenize `text` (str or list of str) with each `<image>` expanded, and preprocess `images`.

        `images` may be one image, a flat list, or one list per text; they are matched to the `<image>` placeholders
        in reading order. Other kwargs go to the tokenizer (`padding`, `return_tensors`, ...) or, when they name an
        image-processor option, to the image processor.
        """
        if text is None:
            raise ValueError("AsyMoEProcessor needs `text`; use one '<image>' placeholder per image in it.")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten_images(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(
                f"The text holds {placeholders} {self.image_token!r} placeholder(s) but {len(flat_images)} image(s) "
                f"were given: put exactly one {self.image_token!r} in the text for each image."
            )
        return_tensors = kwargs.get("return_tensors")
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_KWARGS}
        data = {}
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=return_tensors, **image_kwargs))
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        if kwargs.get("return_offsets_mapping"):
            # Offsets of the text as given, not as expanded: what chat templates' assistant masks are computed on.
            text_inputs = self.tokenizer(expanded, **{k: v for k, v in kwargs.items() if k != "return_tensors"})
            text_inputs["offset_mapping"] = [
                self._original_offsets(t, offsets) for t, offsets in zip(texts, text_inputs["offset_mapping"])
            ]
        else:
            text_inputs = self.tokenizer(expanded, **kwargs)
        data.update(text_inputs)
        if return_mm_token_type_ids:
            ids = text_inputs["input_ids"]
            if hasattr(ids, "eq"):
                data["mm_token_type_ids"] = ids.eq(self.image_token_id).long()
            else:
                data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in row] for row in ids]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _original_offsets(self, text: str, offsets: list) -> list[tuple[int, int]]:
        """Map character offsets in the expanded `text` back to `text`: a token inside the i-th expanded
        placeholder maps onto that placeholder, later tokens shift back by the characters the expansion added."""
        width = len(self.image_token)
        gained = width * (self.num_image_tokens - 1)
        starts = [i for i in range(len(text)) if text.startswith(self.image_token, i)]
        expanded_starts = [s + n * gained for n, s in enumerate(starts)]

        def back(char: int, is_end: bool) -> int:
            n = bisect.bisect_right(expanded_starts, char - 1 if is_end else char)
            if n and char - expanded_starts[n - 1] <= width * self.num_image_tokens - (0 if is_end else 1):
                return starts[n - 1] + (width if is_end else 0)  # inside the n-th placeholder's expansion
            return char - n * gained

        return [(back(start, False), back(end, True)) if end > start else (start, end) for start, end in offsets]

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values"]))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the processor plus the flat remote-code files that `trust_remote_code=True` loads."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_remote_code(save_directory, __file__)
        return result


_IMAGE_KWARGS = {"do_resize", "size", "crop_size", "do_center_crop", "do_normalize", "image_mean", "image_std",
                 "do_rescale", "rescale_factor", "do_convert_rgb", "resample"}


def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


__all__ = ["AsyMoEProcessor", "DEFAULT_CHAT_TEMPLATE"]
