"""`asymoe eval`: every task runs on its local fixture (public-schema parquet) offline with a tiny AsyMoE and a
tiny transformers LLaVA; each task's scoring equals hand-computed values on crafted predictions."""

import functools
import json

import pytest
import torch
from asymoe.eval.easy_vqa import easy_vqa_vocabulary
from asymoe.eval.grounding import GroundingConfig, build_grounding, grounding_vocabulary, save_grounding
from asymoe.eval.runner import update_model_card
from asymoe.eval.tasks import TASKS, load_task_rows, resolve_tasks, score
from asymoe.finetune.data import SHORT_ANSWER_PROMPT
from fixtures_eval import ROWS, write_fixtures

from asymoe import AsyMoEForConditionalGeneration
from asymoe.cli import main as cli_main
from asymoe.tiny import build_tokenizer, tiny_config, tiny_llava, tiny_processor

WORDS = grounding_vocabulary() + easy_vqa_vocabulary() + SHORT_ANSWER_PROMPT.split() + "yes no A B C".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = {task: str(path) for task, path in write_fixtures(root / "fixtures").items()}
    save_grounding(build_grounding(GroundingConfig(train_size=0, validation_size=8, test_size=8)), root / "grounding")
    data["grounding"] = str(root / "grounding")
    tokenizer = build_tokenizer(WORDS)
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    AsyMoEForConditionalGeneration(config).save_pretrained(root / "asymoe")
    tiny_processor(config, tokenizer).save_pretrained(root / "asymoe")
    dense, processor = tiny_llava(tokenizer)
    dense.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    return root, data


@pytest.mark.parametrize("model", ["asymoe", "llava"])
def test_every_task_runs_offline(setup, model):
    root, data = setup
    output = root / f"results-{model}"
    args = ["eval", str(root / model), "--tasks", "standard,grounding,grounding_validation,easy_vqa", "--limit", "4",
            "--batch-size", "3", "--max-new-tokens", "3", "--output", str(output)]
    for task, path in data.items():
        args += ["--data", f"{task}={path}"]
    assert cli_main(args) == 0
    record = json.loads((output / "results.json").read_text())
    assert set(record["results"]) == set(TASKS)
    for name, entry in record["results"].items():
        assert entry["n"] == min(4, len(ROWS.get(name, [None] * 8)))
        assert entry["scoring"] == TASKS[name].scoring  # the reference evaluator followed
        lines = (output / f"{name}.predictions.jsonl").read_text().splitlines()
        assert len(lines) == entry["n"]
        top = 800 if name == "mme" else 1  # MME: points (perception sums up to 10 subtasks of 200)
        assert all(0 <= value <= top for value in entry["metrics"].values())
    assert "| vqav2 |" in (output / "results.md").read_text()


# Crafted predictions per task, and the metrics they must give (hand-computed in the comments).
CRAFTED = {
    # Q1 all 10 said red: 1. Q2 "two" -> "2": 4 of 10 said 2 -> leave-one-out: 4 subsets without a "2" keep 3
    # matches (1), ... all 10 subsets keep >= 3 matches -> 1. Mean 1.0. Then a wrong answer to Q2 -> 0.5.
    "vqav2": (["Red.", "two"], {"vqa_accuracy": 1.0}),
    "gqa": (["Yes.", "red"], {"accuracy": 0.5}),  # LLaVA's cleaning: "Yes." -> "yes"
    # Q2: "acme" said by 3 of 10 -> each subset leaving one "acme" out keeps 2 (2/3, 3 times), others 3 (1, 7
    # times): (3 * 2/3 + 7) / 10 = 0.9. Q1 wrong: 0. Mean 0.45.
    "textvqa": (["go", "acme"], {"vqa_accuracy": 0.45}),
    "vizwiz": (["Unanswerable", "green"], {"vqa_accuracy": 1.0}),
    "scienceqa_img": (["A", "The answer is B"], {"accuracy": 0.5}),  # LLaVA's reading needs "The answer is B."
    # said yes, yes | truth yes, no -> tp 1, fp 1: acc .5, precision .5, recall 1, f1 2/3, yes ratio 1.
    "pope": (["Yes", "yes, there is"], {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3,
                                         "yes_ratio": 1.0}),
    # color: both right -> 200; OCR: one right -> acc .5, acc+ 0 -> 50. perception 250.
    "mme": (["Yes", "No", "Yes", "Yes"], {"color/score": 200.0, "OCR/score": 50.0, "perception": 250.0}),
    # Rows: q0 right (A), q1 wrong (B, answer C), q0 shifted right (B): circular accuracy over the main rows, q0
    # right in both rows, q1 not -> 1/2.
    "mmbench": (["A", "The answer is B", "B"], {"accuracy": 0.5}),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_scoring_matches_hand_computed(setup, name):
    root, data = setup
    task = TASKS[name]
    rows = list(load_task_rows(task, data[name]))
    predictions, expected = CRAFTED[name]
    result = score(task, predictions, rows)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_grounding_breakdown(setup):
    root, data = setup
    task = TASKS["grounding_hierarchy"]
    rows = list(load_task_rows(task, data["grounding"]))
    predictions = [r["answer"] if r["level"] == "leaf" else "wrong" for r in rows]
    result = score(task, predictions, rows)
    assert result["exact_match"] == 0.5
    assert result["exact_match/level=leaf"] == 1.0 and result["exact_match/level=family"] == 0.0


def test_model_card_and_errors(setup, tmp_path):
    root, _ = setup
    card = update_model_card(root / "asymoe", {"gqa": {"metrics": {"exact_match": 0.5}, "n": 2}}, "tiny")
    text = card.read_text()
    assert "model-index" in text and "exact_match" in text
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks(["vqa"])
    with pytest.raises(ValueError, match="--data grounding=PATH"):
        load_task_rows(TASKS["grounding_prior"], None)
    assert cli_main(["eval", str(root / "asymoe"), "--tasks", "nope", "--output", str(tmp_path)]) == 2
    assert cli_main(["eval", str(root / "asymoe"), "--tasks", "gqa", "--data", "vqav2=x", "--output",
                     str(tmp_path)]) == 2
    assert cli_main(["eval", str(root / "asymoe"), "--tasks", "gqa", "--data", f"gqa={tmp_path / 'missing'}",
                     "--output", str(tmp_path)]) == 2
    assert TASKS["textvqa"].prompt(ROWS["textvqa"][0]).startswith("what is written ?\nReference OCR token: stop\n")


def test_broken_cache_stops_the_run(setup):
    """The canary: a model whose decoding steps ignore the KV cache (what transformers 5.24's renamed cache argument
    did to remote code that only knew `past_key_values`) stops `evaluate_model` instead of writing wrong scores."""
    from asymoe.eval.runner import CachedGenerationMismatch, evaluate_model
    from asymoe.processing import AsyMoEProcessor

    root, data = setup
    model = AsyMoEForConditionalGeneration.from_pretrained(root / "asymoe").eval()
    processor = AsyMoEProcessor.from_pretrained(root / "asymoe")
    evaluate_model(model, processor, ["grounding"], data, limit=4, batch_size=4, max_new_tokens=6, progress=False)

    forward = model.forward

    @functools.wraps(forward)  # `generate` checks its inputs against the forward's signature
    def forgetful(*args, cache=None, past_key_values=None, attention_mask=None, **kwargs):
        # Decoding steps without their history (and a mask cut to match, so no shape check notices).
        length = kwargs["input_ids"].shape[1]
        return forward(*args, attention_mask=None if attention_mask is None else attention_mask[:, -length:], **kwargs)

    model.forward = forgetful
    with pytest.raises(CachedGenerationMismatch, match="differ from answers without it"):
        evaluate_model(model, processor, ["grounding"], data, limit=4, batch_size=4, max_new_tokens=6,
                       progress=False)


def test_missing_model_directory_is_a_clear_error(setup, tmp_path, capsys):
    root, data = setup
    missing = tmp_path / "no-such-model"
    assert cli_main(["eval", str(missing), "--tasks", "grounding", "--data", f"grounding={data['grounding']}"]) == 2
    assert f"MODEL {missing}: no such directory" in capsys.readouterr().err
