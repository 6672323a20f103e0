"""Training data for the SFT/DPO scripts: every supported format becomes TRL's conversational vision format.

Rows end up as `{"messages": [...content lists...], "images": [...]}`, which TRL's vision collator tokenizes with
the processor's chat template; with `assistant_only_loss=True` and the `{% generation %}` blocks of the AsyMoE
(LLaVA-1.5) template only assistant tokens are trained — never prompts or image placeholders.

Formats:
- `messages`: already conversational (`messages` + `images`); content lists, or strings where `<image>` marks the
  images (strings without it get the images before the first user text, as TRL does);
- `llava`: LLaVA-665K-style JSON rows, `{"image": "rel/path.jpg", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`; paths resolve against `image_folder`; rows
  without `image` are text-only;
- `vqa`: the project's VQA schema (`image`, `question`, `answer`: the grounding benchmark, easy-vqa), asked with
  LLaVA-1.5's short-answer prompt.

Images stay undecoded (a path or the stored bytes of a `datasets.Image` column) until the collator reads a row, so
converting a 665K-row file neither opens nor copies an image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
FORMATS = ("messages", "llava", "vqa")
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_REQUIRED = {"messages": {"messages"}, "llava": {"conversations"}, "vqa": {"image", "question", "answer"}}


def detect_format(column_names: list[str]) -> str:
    """The data format (one of `FORMATS`) the columns of a data set belong to."""
    if "messages" in column_names:
        return "messages"
    if "conversations" in column_names:
        return "llava"
    if {"question", "answer"} <= set(column_names):
        return "vqa"
    raise ValueError(f"cannot tell the data format from the columns {column_names}: expected `messages` (+ `images`),"
                     " LLaVA `conversations` (+ `image`) or VQA `question`/`answer` (+ `image`).")


def vqa_messages(question: str, answer: str | None = None) -> list[dict]:
    """The LLaVA-1.5 short-answer turn (the prompt the evaluation uses), with the answer as assistant turn."""
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"{question}\n{SHORT_ANSWER_PROMPT}"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def text_to_content(text: str) -> list[dict]:
    """`"<image>\\nWhat is this?"` → `[{"type": "image"}, {"type": "text", "text": "What is this?"}]`."""
    content = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def llava_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA `conversations` (`from`: human/gpt/system, `value` with `<image>`) as chat messages."""
    messages = []
    for turn in conversations:
        role = _ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown LLaVA speaker {turn['from']!r}; expected one of {sorted(_ROLES)}.")
        messages.append({"role": role, "content": text_to_content(turn["value"])})
    return messages


def structured_messages(messages: list[dict], num_images: int) -> list[dict]:
    """Content lists in every turn, one `{"type": "image"}` part per image: where `<image>` stands in string
    content, else before the first user text."""
    messages = [{**m, "content": text_to_content(m["content"])} if isinstance(m["content"], str) else m
                for m in messages]
    placeholders = sum(part["type"] == "image" for m in messages for part in m["content"])
    if placeholders == 0 and num_images:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError("a row has images but no user turn to put them in.")
        messages[first] = {**messages[first], "content": [{"type": "image"}] * num_images + messages[first]["content"]}
    elif placeholders != num_images:
        raise ValueError(f"a row has {placeholders} image placeholders and {num_images} images: give each image one "
                         f"{{'type': 'image'}} part (or {IMAGE_PLACEHOLDER!r} in string content).")
    return messages


def image_storage(value, image_folder: str | os.PathLike | None = None) -> dict:
    """An image as a `datasets.Image` column stores it (`{"bytes", "path"}`), without decoding it: a PIL image, stored
    bytes, or a path; relative paths resolve against `image_folder`, never the working directory."""
    if isinstance(value, Image.Image):
        return datasets.Image().encode_example(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value
        value = value.get("path")
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"an image must be a PIL image, a path or a datasets.Image value; got {value!r}.")
    path = Path(value)
    if not path.is_absolute():
        if image_folder is None:
            raise ValueError(f"image path {value!r} is relative: pass --image_folder, the folder it is relative to.")
        path = Path(image_folder) / path
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist (check --image_folder).")
    return {"bytes": None, "path": str(path)}


def _without_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def convert_rows(dataset: datasets.Dataset, convert: Callable[[dict], dict], desc: str) -> datasets.Dataset:
    """`dataset.map(convert)` with images left undecoded (`convert` sees `{"bytes", "path"}` dicts and returns
    `image_storage` values in `images`); the result's `images` decode to RGB PIL images when a row is read."""
    converted = _without_decoding(dataset).map(convert, remove_columns=dataset.column_names, desc=desc)
    return converted.cast_column("images", datasets.List(datasets.Image(mode="RGB")))


def to_conversations(dataset: datasets.Dataset, data_format: str = "auto",
                     image_folder: str | os.PathLike | None = None) -> datasets.Dataset:
    """Map a `datasets.Dataset` in any supported format to `messages` + `images` rows."""
    data_format = detect_format(dataset.column_names) if data_format == "auto" else data_format
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; use one of {FORMATS} or 'auto'.")
    if missing := _REQUIRED[data_format] - set(dataset.column_names):
        raise ValueError(f"{data_format} data needs the columns {sorted(missing)}; it has {dataset.column_names}.")

    def convert(row):
        if data_format == "vqa":
            return {"messages": vqa_messages(row["question"], row["answer"]),
                    "images": [image_storage(row["image"], image_folder)]}
        if data_format == "llava":
            image = row.get("image")
            return {"messages": llava_messages(row["conversations"]),
                    "images": [] if image is None else [image_storage(image, image_folder)]}
        images = [image_storage(image, image_folder) for image in row.get("images") or []]
        return {"messages": structured_messages(row["messages"], len(images)), "images": images}

    return convert_rows(dataset, convert, "to conversations")


def load_split(path: str, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """One split, as stored, of a `save_to_disk` directory (the grounding benchmark), a JSON/JSONL file (LLaVA
    format), a local data set folder or a Hub data set (`name`: its configuration)."""
    source = Path(path)
    if (source / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(source))
        if split not in splits:
            raise ValueError(f"{path} has no split {split!r}; it has {sorted(splits)}.")
        return splits[split]
    if source.suffix in (".json", ".jsonl"):
        if not source.is_file():
            raise FileNotFoundError(f"data file {path} does not exist.")
        return datasets.load_dataset("json", data_files=str(source), split="train")
    return datasets.load_dataset(path, name=name, split=split)


def default_image_folder(path: str, image_folder: str | os.PathLike | None) -> str | os.PathLike | None:
    """`image_folder`, or for a JSON/JSONL file its folder: the default relative image paths resolve against."""
    if image_folder is None and Path(path).suffix in (".json", ".jsonl"):
        return Path(path).parent
    return image_folder


@dataclass
class DataScriptArguments:
    """Data flags the SFT and DPO scripts share (besides TRL's `--dataset_name`, `--dataset_config`, splits)."""

    image_folder: str | None = field(
        default=None, metadata={"help": "folder relative image paths resolve against (default for a JSON file: its "
                                        "folder)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})

    def first_train_rows(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """`dataset`, cut to `max_train_samples` rows when set."""
        if self.max_train_samples is None:
            return dataset
        return dataset.select(range(min(self.max_train_samples, len(dataset))))


def load_training_data(path: str, split: str = "train", data_format: str = "auto",
                       image_folder: str | os.PathLike | None = None, name: str | None = None) -> datasets.Dataset:
    """`load_split` + `to_conversations`."""
    return to_conversations(load_split(path, split, name), data_format, default_image_folder(path, image_folder))
