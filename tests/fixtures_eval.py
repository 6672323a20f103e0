"""Tiny local copies of the benchmark tasks, in the column schemas of their public Hub parquet copies."""

from pathlib import Path

import datasets
from PIL import Image


def _image(colour: str) -> Image.Image:
    return Image.new("RGB", (40, 30), colour)


def _answers(words: list[str]) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


ROWS = {
    "vqav2": [
        {"question_id": 1, "question": "what color is the shape ?", "answers": _answers(["red"] * 10),
         "image": _image("red"), "image_id": 7, "multiple_choice_answer": "red", "answer_type": "other",
         "question_type": "what color is the"},
        {"question_id": 2, "question": "how many ?", "answers": _answers(["2"] * 4 + ["3"] * 6),
         "image": _image("blue"), "image_id": 8, "multiple_choice_answer": "3", "answer_type": "number",
         "question_type": "how many"},
    ],
    # GQA's Hub copy keeps images in a separate config (joined on imageId by the loader); local copies hold both.
    "gqa": [
        {"id": "g1", "imageId": "n1", "question": "is it red ?", "answer": "yes", "fullAnswer": "Yes, it is red.",
         "image": _image("red")},
        {"id": "g2", "imageId": "n2", "question": "what color ?", "answer": "blue", "fullAnswer": "It is blue.",
         "image": _image("blue")},
    ],
    "textvqa": [
        {"question_id": 1, "question": "what is written ?", "image_id": "t1", "image": _image("white"),
         "answers": ["stop"] * 10, "ocr_tokens": ["stop"]},
        {"question_id": 2, "question": "what brand ?", "image_id": "t2", "image": _image("gray"),
         "answers": ["acme"] * 3 + ["acme inc"] * 7, "ocr_tokens": ["acme"]},
    ],
    "vizwiz": [
        {"question_id": "v1", "image": _image("black"), "question": "what is this ?",
         "answers": ["unanswerable"] * 10, "category": "unanswerable"},
        {"question_id": "v2", "image": _image("green"), "question": "what color ?", "answers": ["green"] * 10,
         "category": "other"},
    ],
    "scienceqa_img": [
        {"image": _image("red"), "question": "which is red ?", "choices": ["apple", "sky"], "answer": 0,
         "hint": "look", "task": "closed choice", "grade": "grade1", "subject": "natural science"},
        {"image": _image("blue"), "question": "which is blue ?", "choices": ["apple", "sky", "grass"],
         "answer": 1, "hint": "", "task": "closed choice", "grade": "grade1", "subject": "natural science"},
    ],
    "pope": [
        {"id": "1", "question_id": "1", "question": "is there a dog in the image ?", "answer": "yes",
         "image_source": "a", "image": _image("red"), "category": "adversarial"},
        {"id": "2", "question_id": "2", "question": "is there a cat in the image ?", "answer": "no",
         "image_source": "a", "image": _image("red"), "category": "random"},
    ],
    "mme": [
        {"question_id": "color/1.png", "image": _image("red"), "question": "is it red ? Please answer yes or no.",
         "answer": "Yes", "category": "color"},
        {"question_id": "color/1.png", "image": _image("red"), "question": "is it blue ? Please answer yes or no.",
         "answer": "No", "category": "color"},
        {"question_id": "OCR/2.png", "image": _image("white"), "question": "does it say stop ? Please answer yes or no.",
         "answer": "Yes", "category": "OCR"},
        {"question_id": "OCR/2.png", "image": _image("white"), "question": "does it say go ? Please answer yes or no.",
         "answer": "No", "category": "OCR"},
    ],
    "mmbench": [
        {"index": "0", "question": "which color ?", "hint": "an image", "A": "red", "B": "blue", "C": None, "D": None,
         "answer": "A", "category": "attribute", "image": _image("red"), "source": "x", "L2-category": "fine",
         "comment": "", "split": "dev"},
        {"index": "1", "question": "which shape ?", "hint": None, "A": "circle", "B": "square", "C": "star",
         "D": None, "answer": "C", "category": "attribute", "image": _image("red"), "source": "x",
         "L2-category": "fine", "comment": "", "split": "dev"},
        # The same question with its options shifted (circular evaluation): index + 1,000,000.
        {"index": "1000000", "question": "which color ?", "hint": "an image", "A": "blue", "B": "red", "C": None,
         "D": None, "answer": "B", "category": "attribute", "image": _image("red"), "source": "x",
         "L2-category": "fine", "comment": "", "split": "dev"},
    ],
}


def write_fixtures(root: Path) -> dict[str, Path]:
    """One parquet file per task under `root`; returns {task: path}."""
    paths = {}
    for task, rows in ROWS.items():
        path = root / task / "data.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
        paths[task] = path
    return paths
