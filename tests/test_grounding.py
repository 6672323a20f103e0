"""The grounding benchmark: deterministic per seed, splits with the specified prior statistics; easy-vqa adapter."""

import json
import math

import pytest

from asymoe.eval.easy_vqa import easy_vqa_vocabulary, load_easy_vqa
from asymoe.eval.grounding import (
    COLOURS,
    DEFAULT_COLOUR,
    SHAPES,
    GroundingConfig,
    build_grounding,
    grounding_vocabulary,
    load_grounding,
    patch_labels,
    prior_answer,
    save_grounding,
    statistics,
)
from asymoe.tiny import build_tokenizer

SMALL = dict(train_size=800, validation_size=48, test_size=96)


@pytest.fixture(scope="module")
def dataset():
    return build_grounding(GroundingConfig(seed=3, **SMALL))


def test_deterministic_per_seed(dataset):
    again = build_grounding(GroundingConfig(seed=3, **SMALL))
    other = build_grounding(GroundingConfig(seed=4, **SMALL))
    for split in dataset:
        assert list(dataset[split]["question"]) == list(again[split]["question"])
        assert list(dataset[split]["scene"]) == list(again[split]["scene"])
        assert [im.tobytes() for im in dataset[split][:8]["image"]] == [im.tobytes() for im in again[split][:8]["image"]]
    assert list(dataset["train"]["scene"]) != list(other["train"]["scene"])


def test_split_statistics(dataset):
    stats = statistics(dataset)
    # Train: the prior holds with probability 0.9 per row; 800 rows -> std 0.0106; 5 std cannot flake for a seed.
    assert abs(stats["train"]["prior_consistent"] - 0.9) < 5 * math.sqrt(0.9 * 0.1 / 800)
    assert stats["test_prior"]["prior_consistent"] == 1.0 and stats["test_prior"]["prior_only_accuracy"] == 1.0
    assert stats["test_counter"]["prior_consistent"] == 0.0 and stats["test_counter"]["prior_only_accuracy"] == 0.0
    assert stats["test_hierarchy"]["levels"] == {"leaf": 48, "family": 48}
    assert stats["test_hierarchy"]["prior_consistent"] == 0.5
    # Balanced: no prior, a default pair as often as uniform colours make one (1/6); 96 + 48 rows, 5 std.
    test, validation = stats["test_balanced"]["prior_consistent"], stats["validation_balanced"]["prior_consistent"]
    assert abs((96 * test + 48 * validation) / 144 - 1 / 6) < 5 * math.sqrt(1 / 6 * 5 / 6 / 144)
    # The validation splits are built like the test splits, from their own random streams.
    for kind in ("balanced", "prior", "counter", "hierarchy"):
        validation, test = stats[f"validation_{kind}"], stats[f"test_{kind}"]
        assert validation["rows"] == 48
        if kind != "balanced":  # drawn, not fixed, there
            assert validation["prior_only_accuracy"] == test["prior_only_accuracy"]
            assert validation["prior_consistent"] == test["prior_consistent"]
        assert not set(dataset[f"validation_{kind}"]["scene"]) & set(dataset[f"test_{kind}"]["scene"])
    assert stats["validation_hierarchy"]["levels"] == {"leaf": 24, "family": 24}


def test_rows_describe_their_scene(dataset):
    for row in dataset["test_counter"].select(range(24)):
        main = json.loads(row["scene"])["objects"][0]
        named = main["shape"] if row["question_type"].startswith("color") else main["colour"]
        assert named in row["question"]
        assert DEFAULT_COLOUR[main["shape"]] != main["colour"]
        assert prior_answer(row["question_type"], main["shape"], main["colour"]) != row["answer"]
        assert row["image"].size == (32, 32)


def test_patch_labels():
    square = {"shape": "square", "colour": "blue", "box": [0, 0, 16, 16]}  # drawn on [1.6, 14.4]²
    ring = {"shape": "ring", "colour": "red", "box": [16, 16, 32, 32]}  # outline width 3: a hole in the middle
    shapes, colours = patch_labels({"objects": [square, ring]}, image_size=32, patch_size=4)
    grid = [shapes[row * 8:(row + 1) * 8] for row in range(8)]
    blue, red = list(COLOURS).index("blue") + 1, list(COLOURS).index("red") + 1
    assert grid[1][1] == SHAPES.index("square") + 1 and colours[1 * 8 + 1] == blue  # inside the square
    assert grid[0][5] == 0 and colours[5] == 0  # nothing drawn there
    assert grid[4][6] == SHAPES.index("ring") + 1 and colours[4 * 8 + 6] == red  # on the ring's outline
    assert grid[6][6] == 0  # the ring's hole
    with pytest.raises(ValueError, match="patch_size"):
        patch_labels({"objects": [square]}, image_size=32, patch_size=5)


def test_save_load_round_trip(dataset, tmp_path):
    target = save_grounding(dataset, tmp_path / "grounding", GroundingConfig(seed=3, **SMALL))
    loaded = load_grounding(target)
    assert list(loaded["test_prior"]["question"]) == list(dataset["test_prior"]["question"])
    assert json.loads((target / "grounding_config.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["grounding"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="asymoe grounding"):
        load_grounding(tmp_path / "missing")


def test_vocabularies_cover_every_word(dataset):
    tokenizer = build_tokenizer(grounding_vocabulary())
    text = " ".join(list(dataset["train"]["question"]) + list(dataset["train"]["answer"]))
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    easy = load_easy_vqa("test", limit=50)
    assert set(easy.column_names) == set(dataset["train"].column_names)
    assert set(list(easy["question_type"])) <= {"color", "shape", "yes_no"}
    tokenizer = build_tokenizer(easy_vqa_vocabulary())
    assert tokenizer.unk_token_id not in tokenizer(" ".join(list(easy["question"]) + list(easy["answer"])))["input_ids"]
    assert easy[0]["image"].size == (64, 64)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("prior_strength", 1.5, "prior_strength"), ("image_size", 8, "image_size"), ("train_size", -1, "train_size")],
)
def test_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        GroundingConfig(**{field: value})
    with pytest.raises(ValueError, match="splits"):
        load_easy_vqa("validation")
