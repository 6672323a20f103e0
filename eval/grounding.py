"""The grounding benchmark: procedural scenes whose training split carries strong language priors.

Every shape has a default colour (circle → red, ...). In `train` a scene's main object takes its default colour
with probability `prior_strength`, so a model can answer many questions without looking. `test_balanced` has no
prior (colours uniform, as in the dense model's pre-training): plain competence. The other test splits separate
the two behaviours the paper contrasts (DESIGN §1): in `test_prior` the image agrees with the prior, in
`test_counter` it contradicts it at every taxonomy level (accuracy there = grounding), and `test_hierarchy` asks
each scene's questions at both levels of the shape/colour taxonomy (leaf: "red", "circle"; family: "warm",
"round"). The `validation_*` splits are built like the test splits from their own random streams: every choice
(prior strength, steps, knobs) is made on them. `patch_labels` gives each image patch the shape and colour of the
object under it, the targets of the demo's vision pretraining. See docs/grounding.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_directory

COLOURS = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (237, 201, 40),
    "green": (44, 160, 44), "blue": (31, 90, 220), "purple": (148, 53, 189),
}
COLOUR_FAMILY = {"red": "warm", "orange": "warm", "yellow": "warm", "green": "cool", "blue": "cool", "purple": "cool"}
SHAPE_FAMILY = {"circle": "round", "ring": "round", "triangle": "pointed", "star": "pointed", "square": "boxy",
                "diamond": "boxy"}
# The language prior of the training split: each shape's default colour (a bijection, so colour → shape too).
DEFAULT_COLOUR = {"circle": "red", "ring": "blue", "triangle": "orange", "star": "purple", "square": "green",
                  "diamond": "yellow"}
DEFAULT_SHAPE = {colour: shape for shape, colour in DEFAULT_COLOUR.items()}
SHAPES = tuple(SHAPE_FAMILY)
QUESTION_TYPES = ("color", "color_family", "shape", "shape_family")
LEVEL = {"color": "leaf", "shape": "leaf", "color_family": "family", "shape_family": "family"}
EVALUATION_KINDS = ("balanced", "prior", "counter", "hierarchy")
SPLITS = ("train", *(f"{part}_{kind}" for part in ("validation", "test") for kind in EVALUATION_KINDS))


@dataclass
class GroundingConfig:
    """What `build_grounding` generates. Sizes are rows per split; every row is one (image, question, answer)."""

    seed: int = 0
    prior_strength: float = 0.9
    image_size: int = 32
    distractor_rate: float = 0.5
    train_size: int = 4000
    validation_size: int = 200  # rows of each validation split
    test_size: int = 300  # rows of each test split

    def __post_init__(self):
        if not 0.0 <= self.prior_strength <= 1.0:
            raise ValueError(f"prior_strength={self.prior_strength} must be in [0, 1] (0.9: the prior holds 90%).")
        if not 0.0 <= self.distractor_rate <= 1.0:
            raise ValueError(f"distractor_rate={self.distractor_rate} must be in [0, 1].")
        if self.image_size < 24:
            raise ValueError(f"image_size={self.image_size} is too small to draw two shapes; use 24 or more.")
        for name in ("train_size", "validation_size", "test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")


def question_text(question_type: str, shape: str, colour: str) -> str:
    """The question about the main object (named by its shape for colour questions, by its colour otherwise)."""
    return {
        "color": f"what color is the {shape} ?",
        "color_family": f"is the {shape} warm or cool ?",
        "shape": f"what shape is the {colour} object ?",
        "shape_family": f"is the {colour} object round , pointed or boxy ?",
    }[question_type]


def true_answer(question_type: str, shape: str, colour: str) -> str:
    return {"color": colour, "color_family": COLOUR_FAMILY[colour], "shape": shape,
            "shape_family": SHAPE_FAMILY[shape]}[question_type]


def prior_answer(question_type: str, shape: str, colour: str) -> str:
    """What a blind model that learned only the training prior answers: it reads the object named in the question
    (the shape for colour questions, the colour for shape questions) and returns its default partner's answer."""
    if question_type.startswith("color"):
        return true_answer(question_type, shape, DEFAULT_COLOUR[shape])
    return true_answer(question_type, DEFAULT_SHAPE[colour], colour)


def grounding_vocabulary() -> list[str]:
    """Every word of every question and answer (questions split on spaces; "?" and "," are separate words)."""
    words = []
    for question_type in QUESTION_TYPES:
        for shape in SHAPE_FAMILY:
            for colour in COLOURS:
                words += question_text(question_type, shape, colour).split()
                words.append(true_answer(question_type, shape, colour))
    return list(dict.fromkeys(words))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    cx, cy, r = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r / 2.5)))
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "star":
        points = [(cx + (r if i % 2 == 0 else 0.42 * r) * math.sin(i * math.pi / 5),
                   cy - (r if i % 2 == 0 else 0.42 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=fill)


def patch_labels(scene: str | dict, image_size: int, patch_size: int) -> tuple[list[int], list[int]]:
    """Per image patch (row-major), the index + 1 in `SHAPES` and in `COLOURS` of the object covering most of its
    pixels, 0 where no object pixel falls (background). `scene` is a row's `scene` column (JSON or parsed)."""
    if image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}.")
    objects = (json.loads(scene) if isinstance(scene, str) else scene)["objects"]
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    for index, obj in enumerate(objects):
        _draw_shape(draw, obj["shape"], tuple(obj["box"]), index + 1)
    grid = image_size // patch_size
    patches = np.asarray(mask).reshape(grid, patch_size, grid, patch_size).swapaxes(1, 2).reshape(grid * grid, -1)
    counts = np.stack([(patches == index + 1).sum(axis=1) for index in range(len(objects))], axis=1)
    owner = counts.argmax(axis=1)
    covered = counts.max(axis=1) > 0
    shape_ids = np.array([SHAPES.index(obj["shape"]) + 1 for obj in objects])
    colour_ids = np.array([list(COLOURS).index(obj["colour"]) + 1 for obj in objects])
    shapes = np.where(covered, shape_ids[owner], 0).tolist()
    colours = np.where(covered, colour_ids[owner], 0).tolist()
    return shapes, colours


def render(objects: list[dict], size: int, rng: random.Random) -> Image.Image:
    """Light, slightly tinted background; each object {shape, colour, box} drawn with a small colour jitter."""
    shade = rng.randint(215, 245)
    image = Image.new("RGB", (size, size), (shade + rng.randint(-8, 8), shade, shade + rng.randint(-8, 8)))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLOURS[obj["colour"]])
        _draw_shape(draw, obj["shape"], tuple(obj["box"]), fill)
    return image


def _layout(rng: random.Random, size: int, count: int) -> list[list[int]]:
    """Boxes for `count` objects: one anywhere, or two side by side (left/right or top/bottom halves)."""
    if count == 1:
        side = rng.randint(size // 2, size - 6)
        x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        return [[x, y, x + side, y + side]]
    side = rng.randint(size // 3, size // 2 - 2)
    boxes = []
    horizontal = rng.random() < 0.5
    for half in range(2):
        lo = half * size // 2
        a = rng.randint(lo + 1, lo + size // 2 - side - 1)
        b = rng.randint(1, size - side - 1)
        x, y = (a, b) if horizontal else (b, a)
        boxes.append([x, y, x + side, y + side])
    rng.shuffle(boxes)
    return boxes


def _sample_row(rng: random.Random, config: GroundingConfig, question_type: str, agree: bool,
                counter_family: bool) -> dict:
    """One scene and question. `agree`: the main object's (shape, colour) is a default pair. Otherwise it breaks
    the prior; with `counter_family` it breaks it at the family level too (a partner from the other family)."""
    asks_colour = question_type.startswith("color")
    shape = rng.choice(list(SHAPE_FAMILY))
    colour = DEFAULT_COLOUR[shape]
    if not agree:
        if asks_colour:  # the shape is named in the question: change the colour
            choices = [c for c in COLOURS if c != colour]
            if counter_family:
                choices = [c for c in choices if COLOUR_FAMILY[c] != COLOUR_FAMILY[colour]]
            colour = rng.choice(choices)
        else:  # the colour is named: change the shape
            default_shape = shape
            choices = [s for s in SHAPE_FAMILY if s != default_shape]
            if counter_family:
                choices = [s for s in choices if SHAPE_FAMILY[s] != SHAPE_FAMILY[default_shape]]
            shape = rng.choice(choices)
    objects = [{"shape": shape, "colour": colour}]
    if rng.random() < config.distractor_rate:
        objects.append({"shape": rng.choice([s for s in SHAPE_FAMILY if s != shape]),
                        "colour": rng.choice([c for c in COLOURS if c != colour])})
    for obj, box in zip(objects, _layout(rng, config.image_size, len(objects))):
        obj["box"] = box
    return {
        "image": render(objects, config.image_size, rng),
        "question": question_text(question_type, shape, colour),
        "answer": true_answer(question_type, shape, colour),
        "question_type": question_type,
        "level": LEVEL[question_type],
        "prior_consistent": DEFAULT_COLOUR[shape] == colour,
        "scene": json.dumps({"objects": objects, "main": 0}),
    }


def _split_rows(config: GroundingConfig, split: str, size: int) -> list[dict]:
    rng = random.Random(f"{config.seed}/{split}")  # per split: changing one size leaves the other splits as they are
    kind = split.rpartition("_")[2]  # validation_counter and test_counter are built alike
    rows = []
    for index in range(size):
        question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        if split == "train":
            agree, counter_family = rng.random() < config.prior_strength, False
        elif kind == "balanced":  # no prior: every colour equally likely for every shape, as in pre-training
            agree, counter_family = rng.random() < 1 / len(COLOURS), False
        elif kind == "prior":
            agree, counter_family = True, False
        elif kind == "counter":
            agree, counter_family = False, True
        else:  # hierarchy: both levels of each question kind, half the scenes against the prior
            agree, counter_family = index % 8 < 4, True
        rows.append(_sample_row(rng, config, question_type, agree, counter_family))
    return rows


def vqa_features():
    """The project's VQA schema (`datasets.Features`), shared by the grounding benchmark and easy-vqa."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({
        "image": datasets.Image(), "question": text, "answer": text, "question_type": text, "level": text,
        "prior_consistent": datasets.Value("bool"), "scene": text,
    })


def build_grounding(config: GroundingConfig | None = None):
    """The benchmark as a `datasets.DatasetDict` (splits: `SPLITS`, those of size 0 left out), identical for the
    same config."""
    import datasets

    config = config or GroundingConfig()
    features = vqa_features()
    sizes = {split: config.train_size if split == "train" else
             config.validation_size if split.startswith("validation") else config.test_size for split in SPLITS}
    splits = {}
    for split in SPLITS:
        if not sizes[split]:  # a split of size 0 is left out (datasets cannot reload empty splits)
            continue
        rows = _split_rows(config, split, sizes[split])
        columns = {name: [row[name] for row in rows] for name in features}  # also right for an empty split
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    dataset = datasets.DatasetDict(splits)
    for split in dataset.values():
        split.info.description = json.dumps({"grounding_config": asdict(config)})
    return dataset


def save_grounding(dataset, directory: str | os.PathLike, config: GroundingConfig | None = None) -> Path:
    """Write with `save_to_disk` into a temporary sibling, then publish it as `directory`, replacing what was there
    (`atomic_directory`: never half-written, the old data kept until the new is complete)."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as temporary:
        dataset.save_to_disk(str(temporary))
        if config is not None:
            (temporary / "grounding_config.json").write_text(json.dumps(asdict(config), indent=2))
    return directory


def load_grounding(directory: str | os.PathLike):
    """The `DatasetDict` written by `save_grounding` (or `asymoe grounding`)."""
    import datasets

    directory = Path(directory)
    if not (directory / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{directory} holds no grounding data set; create one with `asymoe grounding "
                                f"{directory}` (or save_grounding).")
    return datasets.load_from_disk(str(directory))


def statistics(dataset) -> dict[str, dict]:
    """Per split: rows, share of prior-consistent scenes, share a blind prior-only model answers right, levels."""
    result = {}
    for name, split in dataset.items():
        rows = split.remove_columns("image")
        prior_right = 0
        for row in rows:
            main = json.loads(row["scene"])["objects"][0]
            prior_right += prior_answer(row["question_type"], main["shape"], main["colour"]) == row["answer"]
        count = max(len(rows), 1)
        result[name] = {
            "rows": len(rows),
            "prior_consistent": sum(rows["prior_consistent"]) / count,
            "prior_only_accuracy": prior_right / count,
            "levels": dict(Counter(rows["level"])),
        }
    return result


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe grounding`'s arguments, on `parser` (the `asymoe` subcommand's) or a new parser."""
    parser = parser or argparse.ArgumentParser(prog="asymoe grounding", description=__doc__)
    defaults = GroundingConfig()
    parser.add_argument("output", metavar="OUTPUT_DIR", help="directory to write the data set to (save_to_disk)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--prior-strength", type=float, default=defaults.prior_strength,
                        help="train: share of scenes whose main object has its shape's default colour")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--distractor-rate", type=float, default=defaults.distractor_rate)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--validation-size", type=int, default=defaults.validation_size,
                        help="rows of each validation split (built like the test splits)")
    parser.add_argument("--test-size", type=int, default=defaults.test_size, help="rows of each test split")
    return parser


def main(args: argparse.Namespace) -> int:
    """Generate the grounding benchmark and print its statistics."""
    try:
        config = GroundingConfig(
            seed=args.seed, prior_strength=args.prior_strength, image_size=args.image_size,
            distractor_rate=args.distractor_rate, train_size=args.train_size,
            validation_size=args.validation_size, test_size=args.test_size,
        )
    except ValueError as err:
        print(f"asymoe grounding: error: {err}", file=sys.stderr)
        return 2
    dataset = build_grounding(config)
    save_grounding(dataset, args.output, config)
    print(f"wrote {args.output}")
    for name, stats in statistics(dataset).items():
        print(f"  {name:15s} {stats['rows']:6d} rows, prior-consistent {stats['prior_consistent']:.2f}, "
              f"prior-only accuracy {stats['prior_only_accuracy']:.2f}, levels {stats['levels']}")
    return 0
