"""The SFT script (a thin layer over TRL's SFTTrainer): model given as a path with trust_remote_code, exact label masks,
routing logged, loss goes down, the routers balance without a loss, resume continues the same run; freezing schemes,
AsyMoE's optimizer groups, LoRA through `lora_config`; data formats. Multi-process runs: test_sft_distributed.py;
TRL and PEFT used directly, without the script: test_stock_trl.py."""

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_trl_vision_masks, save_training_setup

from asymoe import AsyMoEForConditionalGeneration
from asymoe.finetune.data import llava_messages, to_conversations
from asymoe.finetune.lora import lora_config
from asymoe.finetune.optim import apply_freezing
from asymoe.finetune.sft import main

pytestmark = needs_trl_vision_masks

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configuration/recipes/sft_tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_training_setup(tmp_path_factory.mktemp("sft"), train_size=16)


def run_sft(tiny, output, *extra):
    return main(["--config", RECIPE, "--model_name_or_path", str(tiny / "model"), "--dataset_name",
                 str(tiny / "data"), "--output_dir", str(output), "--per_device_train_batch_size", "8",
                 "--logging_steps", "1", *extra])


@pytest.fixture(scope="module")
def trained(tiny):
    return run_sft(tiny, tiny / "run", "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "6",
                   "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0.1")


def test_labels_only_on_the_answer(trained, tiny):
    processor = trained.processing_class
    rows = [trained.train_dataset[i] for i in range(4)]
    batch = trained.data_collator(rows)
    image_id = processor.image_token_id
    for input_ids, labels, row in zip(batch["input_ids"], batch["labels"], rows):
        trained_ids = input_ids[labels != -100].tolist()
        answer = row["messages"][1]["content"][0]["text"]
        assert trained_ids == processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            processor.tokenizer.eos_token_id]
        assert (labels[input_ids == image_id] == -100).all()


def test_training_logs_and_outputs(trained, tiny):
    history = [h for h in trained.state.log_history if "loss" in h]
    assert len(history) == 12
    assert not any("aux_loss" in h for h in history)  # no trainer-side balancing loss
    assert all("routing/L3/text/evidence" in h and "routing/L1/image/inter" in h for h in history)
    assert all(h["routing/L3/text/imbalance"] >= 1.0 for h in history)
    for block in trained.model.moe_blocks():  # 12 optimizer steps moved every router's balancing bias
        bias = block.router.e_score_correction_bias
        assert bias.abs().max() <= 12 * block.router.bias_update_rate + 1e-6 and bias.abs().sum() > 0
    # Two batches of 8 rows repeat: the loss on them falls.
    assert sum(h["loss"] for h in history[-2:]) < 0.7 * sum(h["loss"] for h in history[:2])
    output = tiny / "run"
    assert (output / "routing.png").is_file() and json.loads((output / "routing.json").read_text())[0]["layer"] == 1
    reloaded = AsyMoEForConditionalGeneration.from_pretrained(output)
    assert torch.equal(reloaded.lm_head.weight, trained.model.lm_head.weight)
    assert (output / "modeling_asymoe.py").is_file()  # the saved model is a Hub bundle


def test_resume_continues_the_same_run(trained, tiny):
    resumed = run_sft(tiny, tiny / "run", "--max_steps", "12", "--resume_from_checkpoint",
                      str(tiny / "run" / "checkpoint-6"), "--save_strategy", "no", "--lr_scheduler_type", "constant",
                      "--warmup_steps", "0", "--weight_decay", "0.1")
    assert resumed.state.global_step == 12
    full = {h["step"]: h["loss"] for h in trained.state.log_history if "loss" in h}
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 6}
    assert sorted(again) == list(range(7, 13))
    for step, loss in again.items():
        assert loss == pytest.approx(full[step], rel=1e-4)


def test_optimizer_groups(trained):
    """AsyMoE-specific parameters in their own groups at --asymoe_lr; no decay on curvature, biases, scales, norms."""
    names = {id(p): n for n, p in trained.model.named_parameters()}
    seen = set()
    for group in trained.optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        seen.update(group_names)
        assert group["lr"] == (1e-3 if group["asymoe"] else 2e-3)
        for name in group_names:
            assert group["asymoe"] == any(key in name for key in ("raw_curvature", "mobius_bias", "log_scale",
                                                                   ".mlp.evidence."))
            no_decay = any(key in name for key in ("raw_curvature", "mobius_bias", "log_scale", "bias", "norm"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert seen == {n for n, p in trained.model.named_parameters() if p.requires_grad}


def test_freezing_schemes(tiny):
    model = AsyMoEForConditionalGeneration.from_pretrained(tiny / "model")
    counts = apply_freezing(model, "moe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n or ".mlp.router." in n or ".mlp.evidence." in n for n in trainable)
    assert any(n.endswith("raw_curvature") for n in trainable) and counts["trainable"] < counts["total"]
    apply_freezing(model, "projector")
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"multi_modal_projector"}
    apply_freezing(model, "vision")
    assert all(p.requires_grad != ("vision_tower" in n) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="freeze scheme"):
        apply_freezing(model, "experts")


def test_use_peft_puts_lora_where_lora_config_says(tiny):
    trainer = run_sft(tiny, tiny / "lora", "--max_steps", "1", "--use_peft", "--lora_r", "2", "--lora_alpha", "4")
    adapter = trainer.model.peft_config["default"]
    expected = lora_config(trainer.model.get_base_model(), rank=2, alpha=4)
    assert (adapter.target_modules, adapter.target_parameters) == (expected.target_modules,
                                                                   expected.target_parameters)
    assert not any("router" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    with pytest.raises(SystemExit):  # AsyMoE's parts are chosen with --lora_targets
        run_sft(tiny, tiny / "bad", "--use_peft", "--lora_target_modules", "q_proj")


def test_llava_json_rows_mask_exactly(trained, tmp_path):
    """LLaVA rows (one text-only) collate with the processor: labels are exactly the answers + </s>, images
    resolve against image_folder and stay undecoded until read."""
    import datasets
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = datasets.Dataset.from_list([
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color ?"},
                                             {"from": "gpt", "value": "red"},
                                             {"from": "human", "value": "what shape ?"},
                                             {"from": "gpt", "value": "circle"}]},
        {"image": None, "conversations": [{"from": "human", "value": "what color"}, {"from": "gpt", "value": "blue"}]},
    ])
    converted = to_conversations(rows, "auto", image_folder=tmp_path)
    stored = converted.with_format("arrow")["images"].to_pylist()
    assert stored[0] == [{"bytes": None, "path": str(tmp_path / "a.png")}]
    user = converted[0]["messages"][0]
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    assert user["content"][1]["text"] == "what color ?"
    assert converted[0]["images"][0].size == (8, 8) and converted[1]["images"] == []
    batch = trained.data_collator([converted[0], converted[1]])
    tokenizer = trained.processing_class.tokenizer

    def ids(*answers):
        return [i for answer in answers for i in tokenizer(answer, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]]

    assert [i[labels != -100].tolist() for i, labels in zip(batch["input_ids"], batch["labels"])] == [
        ids("red", "circle"), ids("blue")]
    with pytest.raises(ValueError, match="image_folder"):
        to_conversations(rows, "llava")
    with pytest.raises(ValueError, match="speaker"):
        llava_messages([{"from": "robot", "value": "hi"}])


def test_string_messages_place_images_once(trained):
    """`messages` rows with string content: `<image>` marks where the image goes (no second placeholder)."""
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8), "blue")
    rows = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "what color <image>"}, {"role": "assistant", "content": "blue"}],
         "images": [image]},
        {"messages": [{"role": "user", "content": "what color"}, {"role": "assistant", "content": "blue"}],
         "images": [image]},
    ])
    converted = to_conversations(rows)
    assert [p["type"] for p in converted[0]["messages"][0]["content"]] == ["text", "image"]
    assert [p["type"] for p in converted[1]["messages"][0]["content"]] == ["image", "text"]
    batch = trained.data_collator([converted[0], converted[1]])
    image_tokens = (batch["input_ids"] == trained.processing_class.image_token_id).sum(-1)
    assert image_tokens.tolist() == [trained.model.config.num_image_tokens] * 2
    with pytest.raises(ValueError, match="2 image placeholders and 1 images"):
        to_conversations(datasets.Dataset.from_list([{**rows[0], "messages": [
            {"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "blue"}]}]))
