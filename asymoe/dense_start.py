"""The demo's dense start: a tiny transformers LLaVA that reads shapes and colours before any prior is introduced.

Built in two stages, as CLIP is pretrained before LLaVA's stages:

1. `pretrain_vision`: the CLIP tower learns, at the layer the projector reads, the shape and the colour of the object
   under each image patch (`asymoe.eval.grounding.patch_labels`) through a linear head that is dropped afterwards;
2. the TRL SFT script trains projector and decoder on balanced grounding questions (no colour prior), the tower
   frozen.

The result for the demo's default settings ships in `asymoe/checkpoints/dense_start/` (about 1 MB of safetensors,
with `dense_start.json`: the settings it was trained with and the weights' SHA-256), so that the demo's minutes go
to upcycling, prior fine-tuning and evaluation. `python -m asymoe.dense_start` re-trains it from scratch and
re-publishes it; `asymoe demo --from-scratch` trains it inside the demo instead of copying it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_directory, atomic_write_text, file_sha256

SHIPPED = Path(__file__).parent / "checkpoints" / "dense_start"
RECORD = "dense_start.json"  # {"settings": the settings it was trained with, "sha256": of model.safetensors}


def vocabulary() -> list[str]:
    """The words of the dense start's tokenizer: every word of the grounding and easy-vqa questions and answers and
    of the short-answer prompt."""
    from .eval.easy_vqa import easy_vqa_vocabulary, question_tokens
    from .eval.grounding import grounding_vocabulary
    from .finetune.data import SHORT_ANSWER_PROMPT

    return list(dict.fromkeys(grounding_vocabulary() + easy_vqa_vocabulary() + question_tokens(SHORT_ANSWER_PROMPT)))


def shipped_dense_start(settings: dict, shipped: Path = SHIPPED) -> Path | None:
    """`shipped` if its checkpoint was trained with exactly `settings` (compared as JSON), else None. Raises if its
    weights do not have the recorded hash (a corrupted or hand-edited copy)."""
    record_path = shipped / RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record["settings"] != json.loads(json.dumps(settings)):
        return None
    weights = shipped / "model.safetensors"
    actual = file_sha256(weights) if weights.is_file() else "missing"
    if actual != record["sha256"]:
        raise ValueError(f"{weights} has SHA-256 {actual}, not the recorded {record['sha256']}: restore it from git "
                         "(`git checkout -- asymoe/checkpoints`) or re-train it (`python -m asymoe.dense_start`).")
    return shipped


def _cosine_with_warmup(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain_vision(model, image_processor, dataset, steps: int, batch_size: int, learning_rate: float, seed: int,
                    log: Callable[[str], None] = print, warmup: int = 20) -> list[dict]:
    """Train the vision tower of the LLaVA `model` in place on `dataset`'s scenes (grounding rows: `image`,
    `scene`): cross-entropy of a linear head on the tower layer the projector reads (`vision_feature_layer`, patch
    tokens only) against each patch's shape and colour (0: background). AdamW, cosine schedule after `warmup`
    steps, batches drawn with replacement from a generator seeded with `seed`. Returns one record per tenth of the
    steps (the batch's losses and its shape accuracy on patches that show an object)."""
    from .eval.grounding import COLOURS, SHAPES, patch_labels

    vision = model.config.vision_config
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer}: vision pretraining supervises one layer.")
    targets = torch.tensor([patch_labels(scene, vision.image_size, vision.patch_size) for scene in dataset["scene"]])
    images = [image.convert("RGB") for image in dataset["image"]]
    pixels = torch.cat([image_processor(images=images[start:start + 512], return_tensors="pt")["pixel_values"]
                        for start in range(0, len(images), 512)])
    tower = model.model.vision_tower
    torch.manual_seed(seed)
    head = nn.Linear(vision.hidden_size, len(SHAPES) + 1 + len(COLOURS) + 1)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_with_warmup(step, steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    skip = 1 if model.config.vision_feature_select_strategy == "default" else 0  # CLIP's CLS token
    tower.train()
    history = []
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        features = tower(pixels[index], output_hidden_states=True).hidden_states[layer][:, skip:]
        shape_logits, colour_logits = head(features).split([len(SHAPES) + 1, len(COLOURS) + 1], dim=-1)
        shape_loss = F.cross_entropy(shape_logits.flatten(0, 1), targets[index, 0].flatten())
        colour_loss = F.cross_entropy(colour_logits.flatten(0, 1), targets[index, 1].flatten())
        optimizer.zero_grad(set_to_none=True)
        (shape_loss + colour_loss).backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            on_object = targets[index, 0] > 0
            record = {"step": step + 1, "shape_loss": round(shape_loss.item(), 4),
                      "colour_loss": round(colour_loss.item(), 4),
                      "object_patch_shape_accuracy":
                          round((shape_logits.argmax(-1) == targets[index, 0])[on_object].float().mean().item(), 4)}
            history.append(record)
            log(f"[vision pretraining] {json.dumps(record)}")
    tower.eval()
    return history


def train_dense_start(config, target: Path, log: Callable[[str], None] = print) -> Path:
    """Train the dense start of `config` (an `asymoe.demo.ComparisonConfig`) from scratch into `target / "model"`:
    balanced scenes drawn for it (colours uniform: prior strength 1/6), vision pretraining, the TRL SFT script with
    the tower frozen. Records the settings and the weights' hash in `model/dense_start.json`; returns the model
    directory."""
    from .demo import run_sft
    from .eval.grounding import GroundingConfig, build_grounding, load_grounding, save_grounding
    from .tiny import build_tokenizer, tiny_llava

    scenes = GroundingConfig(seed=config.dense_seed + 10_000, prior_strength=1 / 6,
                             image_size=config.vision["image_size"], distractor_rate=config.pretrain_distractor_rate,
                             train_size=config.pretrain_size, validation_size=0, test_size=0)
    data = save_grounding(build_grounding(scenes), target / "scenes", scenes)
    torch.manual_seed(config.dense_seed)
    model, processor = tiny_llava(build_tokenizer(vocabulary()), vision=config.vision,
                                  vision_feature_layer=config.vision_feature_layer, **config.text_overrides)
    history = pretrain_vision(model, processor.image_processor, load_grounding(data)["train"],
                              config.vision_pretrain_steps, 2 * config.batch_size, config.vision_learning_rate,
                              config.dense_seed, log=log)
    atomic_write_text(target / "vision_pretraining.json", json.dumps(history, indent=2))
    initial = target / "init"
    model.save_pretrained(initial)
    processor.save_pretrained(initial)
    run_sft(initial, data, target, config.pretrain_steps, config.learning_rate, config.dense_seed, config)
    for scratch in (initial, data):
        shutil.rmtree(scratch)
    model_dir = target / "model"
    for leftover in model_dir.glob("checkpoint-*"):
        shutil.rmtree(leftover)
    record = {"settings": config.dense_settings(), "sha256": file_sha256(model_dir / "model.safetensors")}
    atomic_write_text(model_dir / RECORD, json.dumps(record, indent=2))
    return model_dir


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m asymoe.dense_start", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(SHIPPED),
                        help="where the dense start is published (default: the shipped copy, %(default)s)")
    parser.add_argument("--work", default="outputs/dense_start", help="scratch directory (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Train the dense start of the demo's default settings from scratch and publish it to `--output`."""
    from .demo import ComparisonConfig

    config = ComparisonConfig()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = train_dense_start(config, work)
    with atomic_directory(args.output, overwrite=True) as published:
        for path in [*model_dir.iterdir(), work / "training.json", work / "vision_pretraining.json"]:
            if path.is_file() and path.name != "training_args.bin":
                shutil.copyfile(path, published / path.name)  # modes from the umask, as save_pretrained
    print(f"published {args.output}: SHA-256 {json.loads((model_dir / RECORD).read_text())['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
