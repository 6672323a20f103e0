"""SFT through TRL's SFTTrainer: model given as a path with trust_remote_code, exact label masks, aux loss and routing
logged, loss goes down, resume continues the same run; freezing schemes and AsyMoE's optimizer group; 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asymoe import AsyMoEForConditionalGeneration
from asymoe.eval.grounding import GroundingConfig, build_grounding, grounding_vocabulary, save_grounding
from asymoe.finetune.data import SHORT_ANSWER_PROMPT, llava_messages, to_conversations
from asymoe.finetune.optim import apply_freezing, parameter_groups
from asymoe.finetune.sft import main
from asymoe.tiny import build_tokenizer, tiny_config, tiny_processor

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configuration/recipes/sft_tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny AsyMoE (router logits on, so TRL treats it as MoE) and a small grounding data set."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = build_tokenizer(grounding_vocabulary() + SHORT_ANSWER_PROMPT.split())
    config = tiny_config(tokenizer, output_router_logits=True)
    torch.manual_seed(0)
    AsyMoEForConditionalGeneration(config).save_pretrained(root / "model")
    tiny_processor(config, tokenizer).save_pretrained(root / "model")
    save_grounding(build_grounding(GroundingConfig(train_size=16, validation_size=0, test_size=0)), root / "data")
    return root


def run_sft(tiny, output, *extra):
    return main(["--config", RECIPE, "--model_name_or_path", str(tiny / "model"), "--dataset_name",
                 str(tiny / "data"), "--output_dir", str(output), "--per_device_train_batch_size", "8",
                 "--logging_steps", "1", *extra])


@pytest.fixture(scope="module")
def trained(tiny):
    return run_sft(tiny, tiny / "run", "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "6",
                   "--lr_scheduler_type", "constant", "--warmup_steps", "0")


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
    assert all("aux_loss" in h and h["aux_loss"] > 0 for h in history)
    assert all("routing/L3/text/evidence" in h and "routing/L1/image/inter" in h for h in history)
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
                      "--warmup_steps", "0")
    assert resumed.state.global_step == 12
    full = {h["step"]: h["loss"] for h in trained.state.log_history if "loss" in h}
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 6}
    assert sorted(again) == list(range(7, 13))
    for step, loss in again.items():
        assert loss == pytest.approx(full[step], rel=1e-4)


def test_freezing_and_optimizer_groups(tiny):
    model = AsyMoEForConditionalGeneration.from_pretrained(tiny / "model")
    counts = apply_freezing(model, "moe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n or ".mlp.router." in n or ".mlp.evidence." in n for n in trainable)
    assert counts["trainable"] < counts["total"]
    apply_freezing(model, "projector")
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"multi_modal_projector"}
    apply_freezing(model, "none")
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, asymoe_lr=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        if any(n.endswith("raw_curvature") or "mobius_bias" in n for n in group_names):
            assert group["asymoe"] and group["lr"] == 1e-4 and group["weight_decay"] == 0.0
        if any(n.endswith("experts.gate_up_proj") for n in group_names):
            assert group["lr"] == 1e-3 and group["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="freeze scheme"):
        apply_freezing(model, "experts")


def test_llava_json_conversion(tmp_path):
    from PIL import Image
    import datasets

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = datasets.Dataset.from_list([{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}])
    converted = to_conversations(rows, "auto", image_folder=tmp_path)[0]
    user, assistant = converted["messages"]
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    assert user["content"][1]["text"] == "What color?" and assistant["content"][0]["text"] == "red"
    assert converted["images"][0].size == (8, 8)
    with pytest.raises(ValueError, match="image_folder"):
        to_conversations(rows, "llava")
    with pytest.raises(ValueError, match="speaker"):
        llava_messages([{"from": "robot", "value": "hi"}])


@pytest.mark.slow
@pytest.mark.parametrize(("config", "kind"), [("ddp", "MULTI_CPU")])
def test_two_processes_on_cpu(tiny, config, kind):
    """`accelerate launch` with the project's DDP config, 2 CPU processes (torchrun; gloo). FSDP2 is GPU-only:
    accelerate 1.15 runs an FSDP config on CPU as plain MULTI_CPU DDP (docs/finetuning.md)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    output = tiny / config
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / f"configuration/accelerate/{config}.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "-m", "asymoe.finetune.sft", "--config", RECIPE,
               "--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data"),
               "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "4",
               "--logging_steps", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({kind}, world size 2)" in result.stdout, result.stdout[-2000:]
    reloaded = AsyMoEForConditionalGeneration.from_pretrained(output)
    assert reloaded.moe_blocks()[0].experts.gate_up_proj.shape[0] == 4
