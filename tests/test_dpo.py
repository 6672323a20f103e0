"""DPO through TRL's stock DPOTrainer: preference data from the grounding benchmark and plain rows, full and LoRA
training on CPU with rewards logged; no trainer-side MoE loss, the routers balance themselves in full training."""

import math
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_image, save_training_setup

from asymoe import AsyMoEForConditionalGeneration
from asymoe.finetune.data import SHORT_ANSWER_PROMPT
from asymoe.finetune.dpo import main, to_preferences

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configuration/recipes/dpo_tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny AsyMoE and grounding data that breaks the prior."""
    return save_training_setup(tmp_path_factory.mktemp("dpo"), train_size=24, prior_strength=0.0)


def test_grounding_rows_prefer_the_image_over_the_prior(tiny):
    rows = datasets.load_from_disk(str(tiny / "data"))["train"]
    pairs = to_preferences(rows)
    assert 0 < len(pairs) < len(rows)  # family questions whose prior answer is right are left out
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"][0]["text"], pair["rejected"][0]["content"][0]["text"]
        assert chosen != rejected and len(pair["images"]) == 1
        assert pair["prompt"][0]["content"][0]["type"] == "image"
        assert pair["prompt"][0]["content"][1]["text"].endswith(SHORT_ANSWER_PROMPT)
    first = next(row for row in rows if row["question_type"] == "color")
    pair = to_preferences(rows.select([rows["question"].index(first["question"])]))[0]
    assert pair["chosen"][0]["content"][0]["text"] == first["answer"]


def test_plain_preference_rows_become_conversations():
    rows = datasets.Dataset.from_list([
        {"prompt": "what color is the circle ?", "chosen": "red", "rejected": "blue", "images": [make_image(0)]},
        {"prompt": "<image>\nwhat shape ?", "chosen": "circle", "rejected": "square", "images": [make_image(1)]},
    ])
    pairs = to_preferences(rows)
    for pair in pairs:
        assert [part["type"] for part in pair["prompt"][0]["content"]] == ["image", "text"]
        assert pair["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"][0][
            "content"][0]["text"]}]}]
    with pytest.raises(ValueError, match="cannot tell the preference data format"):
        to_preferences(datasets.Dataset.from_list([{"text": "hi"}]))


def run_dpo(tiny, output, *extra):
    return main(["--config", RECIPE, "--model_name_or_path", str(tiny / "model"), "--dataset_name",
                 str(tiny / "data"), "--output_dir", str(output), "--per_device_train_batch_size", "4",
                 "--logging_steps", "1", "--max_steps", "3", *extra])


def assert_dpo_logs(trainer):
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3
    for logs in history:
        assert math.isfinite(logs["loss"]) and "aux_loss" not in logs  # TRL adds no Mixtral loss to AsyMoE
        assert all(math.isfinite(logs[key]) for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert any(logs["rewards/margins"] != 0 for logs in history[1:])  # the policy moved away from the reference


def test_dpo_with_lora_trains_only_the_adapter(tiny):
    trainer = run_dpo(tiny, tiny / "lora")
    assert_dpo_logs(trainer)
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
    base = AsyMoEForConditionalGeneration.from_pretrained(tiny / "model")
    frozen = {name.replace(".base_layer", "").replace(".original_module", ""): param
              for name, param in trainer.model.get_base_model().named_parameters() if not param.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()
    assert all(torch.equal(frozen[name], param) for name, param in base.named_parameters())
    assert (tiny / "lora" / "adapter_config.json").is_file()
    assert (tiny / "lora" / "processor_config.json").is_file()


def test_lora_dropout_on_experts_is_a_usage_error(tiny):
    with pytest.raises(SystemExit):
        run_dpo(tiny, tiny / "bad", "--lora_dropout", "0.05")


def test_full_dpo_balances_routers_without_a_loss(tiny):
    trainer = run_dpo(tiny, tiny / "full", "--use_peft", "false")
    assert_dpo_logs(trainer)
    assert trainer.ref_model is not None
    for policy, reference in zip(trainer.model.moe_blocks(), trainer.ref_model.moe_blocks()):
        assert policy.router.e_score_correction_bias.abs().sum() > 0  # moved by the policy's optimizer steps
        assert reference.router.e_score_correction_bias.abs().sum() == 0  # the frozen reference never routes
