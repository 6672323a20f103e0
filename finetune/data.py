"""Training data for the SFT/DPO scripts: every supported format becomes TRL's conversational vision format.

Rows end up as `{"messages": [...content lists...], "images": [PIL images]}`, which TRL's vision collator
tokenizes with the processor's chat template; with `assistant_only_loss=True` and the `{% generation %}` blocks of
the AsyMoE (LLaVA-1.5) template only assistant tokens are trained — never prompts or image placeholders.

Formats:
- `messages`: already conversational (`messages` + `images`, content lists or plain strings with `<image>`);
- `llava`: LLaVA-665K-style JSON rows, `{"image": "rel/path.jpg", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`; paths resolve against `image_folder`;
- `vqa`: the project's VQA schema (`image`, `question`, `answer`: the grounding benchmark, easy-vqa).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
FORMATS = ("messages", "llava", "vqa")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect_format(column_names: list[str]) -> str:
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


def _text_to_content(text: str) -> list[dict]:
    """"<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", "text": "What is this?"}]."""
    content = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def llava_messages(conversations: list[dict]) -> list[dict]:
    messages = []
    for turn in conversations:
        role = _ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown LLaVA speaker {turn['from']!r}; expected one of {sorted(_ROLES)}.")
        messages.append({"role": role, "content": _text_to_content(turn["value"])})
    return messages


def _open_image(value, image_folder: str | os.PathLike | None):
    if value is None or isinstance(value, Image.Image):
        return value
    path = Path(value)
    if not path.is_absolute():
        if image_folder is None:
            raise ValueError(f"image path {value!r} is relative: pass --image_folder, the folder it is relative to.")
        path = Path(image_folder) / path
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist (check --image_folder).")
    return Image.open(path).convert("RGB")


def to_conversations(dataset, data_format: str = "auto", image_folder: str | os.PathLike | None = None):
    """Map a `datasets.Dataset` in any supported format to `messages` + `images` rows."""
    data_format = detect_format(dataset.column_names) if data_format == "auto" else data_format
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; use one of {FORMATS} or 'auto'.")
    if data_format == "messages":
        if "images" not in dataset.column_names:
            raise ValueError("conversational data needs an `images` column (a list of images per row).")
        return dataset.select_columns(["messages", "images"])

    def convert(row):
        if data_format == "vqa":
            return {"messages": vqa_messages(row["question"], row["answer"]), "images": [row["image"]]}
        image = _open_image(row.get("image"), image_folder)
        return {"messages": llava_messages(row["conversations"]), "images": [image] if image is not None else []}

    return dataset.map(convert, remove_columns=dataset.column_names, desc="to conversations")


def load_training_data(path: str, split: str = "train", data_format: str = "auto",
                       image_folder: str | os.PathLike | None = None):
    """A split of a `save_to_disk` directory (the grounding benchmark), a JSON/JSONL file (LLaVA format) or a
    local data set directory (`datasets.load_dataset`), as conversations."""
    import datasets

    source = Path(path)
    if (source / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(source))[split]
    elif source.suffix in (".json", ".jsonl"):
        dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        image_folder = image_folder or source.parent
    elif source.is_dir():
        dataset = datasets.load_dataset(str(source), split=split)
    else:
        raise FileNotFoundError(f"training data {path!r} not found: give a save_to_disk directory, a LLaVA JSON file "
                                "or a local data set directory.")
    return to_conversations(dataset, data_format, image_folder)
