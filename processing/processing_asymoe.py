"""AsyMoE processor: image processor + tokenizer + chat template; expands each `<image>` to the image's features.

This file is part of the Hub bundle: it imports only transformers and its bundle siblings.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path

from transformers import BatchFeature, ProcessorMixin

from ..configuration.configuration_asymoe import anyres_layout, write_remote_code

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
        image_grid_pinpoints (`list[list[int]]`, *optional*): anyres models (`AsyMoEConfig.image_grid_pinpoints`):
            each `<image>` becomes as many tokens as the model gives that image (base tile, unpadded tile grid, one
            newline per row), and the outputs carry `image_sizes` (and `batch_num_images` from a OneVision image
            processor). Needs an image processor that tiles with the same pinpoints (LLaVA-NeXT / OneVision).
        patch_size (`int`, *optional*): the vision tower's patch size (anyres only).
        vision_aspect_ratio (`str`, *optional*): OneVision's `"anyres_max_N"` feature pooling (anyres only).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        chat_template: str | None = None,
        image_grid_pinpoints: list[list[int]] | None = None,
        patch_size: int | None = None,
        vision_aspect_ratio: str | None = None,
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
        if image_grid_pinpoints is not None:
            image_grid_pinpoints = [[int(h), int(w)] for h, w in image_grid_pinpoints]
            if not patch_size:
                raise ValueError("An anyres AsyMoEProcessor (image_grid_pinpoints set) needs the tower's patch_size.")
            tiling = getattr(image_processor, "image_grid_pinpoints", None)
            if image_processor is not None and [list(p) for p in tiling or []] != image_grid_pinpoints:
                raise ValueError(
                    f"The image processor tiles with image_grid_pinpoints={tiling}, the model expects "
                    f"{image_grid_pinpoints}: use the LLaVA-NeXT / OneVision image processor of the same checkpoint."
                )
        self.image_grid_pinpoints = image_grid_pinpoints
        self.patch_size = patch_size
        self.vision_aspect_ratio = vision_aspect_ratio
        self.auto_map = {"AutoProcessor": "processing_asymoe.AsyMoEProcessor"}
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    def _match_images(self, images, texts: list[str]) -> tuple[list | None, list]:
        """`images` as given (nested lists, a data set column, ...) -> (one list per text or a flat list, the flat
        list). Per-text lists must match each text's `<image>` placeholders."""
        if images is None:
            return None, []
        if _is_image(images):
            return [images], [images]
        items = list(images)
        if all(_is_image(item) for item in items):
            return items, items
        if len(items) != len(texts):
            raise ValueError(
                f"images holds {len(items)} lists for {len(texts)} text(s): give one list of images per text, or "
                "one flat list for all the texts' placeholders in reading order."
            )
        per_text = [[item] if _is_image(item) else list(item) for item in items]
        for index, (sample, text) in enumerate(zip(per_text, texts)):
            if len(sample) != text.count(self.image_token):
                raise ValueError(
                    f"text {index} holds {text.count(self.image_token)} {self.image_token!r} placeholder(s) but its "
                    f"list holds {len(sample)} image(s): give each text the images of its own placeholders."
                )
        return per_text, [image for sample in per_text for image in sample]

    def __call__(self, images=None, text=None, return_mm_token_type_ids: bool = False, **kwargs) -> BatchFeature:
        """Tokenize `text` (str or list of str) with each `<image>` expanded, and preprocess `images`.

        `images` may be one image, a flat list, or one list per text; they are matched to the `<image>` placeholders
        in reading order. Other kwargs go to the tokenizer (`padding`, `return_tensors`, ...) or, when they name an
        image-processor option, to the image processor.
        """
        if text is None:
            raise ValueError("AsyMoEProcessor needs `text`; use one '<image>' placeholder per image in it.")
        texts = [text] if isinstance(text, str) else list(text)
        images, flat_images = self._match_images(images, texts)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(
                f"The text holds {placeholders} {self.image_token!r} placeholder(s) but {len(flat_images)} image(s) "
                f"were given: put exactly one {self.image_token!r} in the text for each image."
            )
        return_tensors = kwargs.get("return_tensors")
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_KWARGS}
        data = {}
        counts = []
        if flat_images:
            # OneVision's image processor needs the per-sample nesting: it does not tile multi-image samples.
            per_sample = "batch_num_images" in getattr(self.image_processor, "model_input_names", ())
            image_inputs = self.image_processor(
                images if per_sample else flat_images, return_tensors=return_tensors, **image_kwargs
            )
            data.update(image_inputs)
            counts = self._image_token_counts(image_inputs, len(flat_images))
        expanded, text_counts = [], []
        for t in texts:
            pieces = t.split(self.image_token)
            mine, counts = counts[: len(pieces) - 1], counts[len(pieces) - 1 :]
            expanded.append("".join(p + self.image_token * n for p, n in zip(pieces, [*mine, 0])))
            text_counts.append(mine)
        if kwargs.get("return_offsets_mapping"):
            # Offsets of the text as given, not as expanded: what chat templates' assistant masks are computed on.
            text_inputs = self.tokenizer(expanded, **{k: v for k, v in kwargs.items() if k != "return_tensors"})
            text_inputs["offset_mapping"] = [
                self._original_offsets(t, offsets, n)
                for t, offsets, n in zip(texts, text_inputs["offset_mapping"], text_counts)
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

    def _image_token_counts(self, image_inputs, num_images: int) -> list[int]:
        """Image tokens of each image, in reading order: `num_image_tokens` each, or for anyres models the base
        tile plus the image's unpadded (pooled) tile grid with one newline per row, as the model computes them."""
        if self.image_grid_pinpoints is None:
            return [self.num_image_tokens] * num_images
        sizes = image_inputs["image_sizes"]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else [list(size) for size in sizes]
        tiled = [True] * len(sizes)
        if image_inputs.get("batch_num_images") is not None:
            tiled = [int(n) == 1 for n in image_inputs["batch_num_images"] for _ in range(int(n))]
        tile_size = int(image_inputs["pixel_values"][0][0].shape[-1])
        max_tiles = int(self.vision_aspect_ratio.rsplit("_", 1)[1]) if self.vision_aspect_ratio else None
        counts = []
        for size, tile in zip(sizes, tiled):
            grid = 1  # a multi-image OneVision sample: the base tile and one newline
            if tile:
                layout = anyres_layout(size, self.image_grid_pinpoints, tile_size, tile_size // self.patch_size,
                                       max_tiles)
                grid = layout.num_grid_features
            counts.append(self.num_image_tokens + grid)
        return counts

    def _original_offsets(self, text: str, offsets: list, counts: list[int]) -> list[tuple[int, int]]:
        """Map character offsets in the expanded `text` back to `text`, whose placeholders were expanded to `counts`
        tokens: a token inside the i-th expanded placeholder maps onto that placeholder, later tokens shift back by
        the characters the expansions before them added."""
        width = len(self.image_token)
        starts = [i for i in range(len(text)) if text.startswith(self.image_token, i)]
        gained = [0]  # characters added by the expansions before each placeholder
        for count in counts:
            gained.append(gained[-1] + width * (count - 1))
        expanded_starts = [start + gained[n] for n, start in enumerate(starts)]

        def back(char: int, is_end: bool) -> int:
            n = bisect.bisect_right(expanded_starts, char - 1 if is_end else char)
            if n and char - expanded_starts[n - 1] <= width * counts[n - 1] - (0 if is_end else 1):
                return starts[n - 1] + (width if is_end else 0)  # inside the n-th placeholder's expansion
            return char - gained[n]

        return [(back(start, False), back(end, True)) if end > start else (start, end) for start, end in offsets]

    @property
    def model_input_names(self) -> list[str]:
        image_inputs = ["pixel_values"] if self.image_grid_pinpoints is None else [
            "pixel_values", "image_sizes", "batch_num_images"]
        return list(dict.fromkeys(self.tokenizer.model_input_names + image_inputs))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the processor plus the flat remote-code files that `trust_remote_code=True` loads."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_remote_code(save_directory, __file__)
        return result


_IMAGE_KWARGS = {"do_resize", "size", "crop_size", "do_center_crop", "do_normalize", "image_mean", "image_std",
                 "do_rescale", "rescale_factor", "do_convert_rgb", "resample", "do_pad"}


def _is_image(item) -> bool:
    """An image (PIL image, array, tensor, path or URL) rather than a collection of them."""
    return isinstance(item, (str, bytes)) or hasattr(item, "shape") or hasattr(item, "mode") or not isinstance(
        item, Iterable)


__all__ = ["AsyMoEProcessor", "DEFAULT_CHAT_TEMPLATE"]
