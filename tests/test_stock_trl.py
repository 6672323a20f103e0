"""An AsyMoE checkpoint trains with stock tools and no AsyMoE code in the loop: a user's own `SFTTrainer` script given
the checkpoint's path, the `trl sft` command line, and a user's own PEFT LoRA on the fused experts
(`target_parameters`), merged back into a checkpoint that loads with its remote code."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import needs_trl_vision_masks, save_training_setup
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from asymoe.routing import RoutingStatistics

pytestmark = needs_trl_vision_masks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny AsyMoE and 32 grounding rows as a user would hold them: image + prompt/completion messages,
    in a parquet file (what `load_dataset(folder)` reads)."""
    root = save_training_setup(tmp_path_factory.mktemp("stock"), train_size=32)
    rows = datasets.load_from_disk(str(root / "data"))["train"]
    dataset = datasets.Dataset.from_dict({
        "images": [[image] for image in rows["image"]],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                   for question in rows["question"]],
        "completion": [[{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
                       for answer in rows["answer"]],
    })
    (root / "parquet").mkdir()
    dataset.to_parquet(root / "parquet" / "train.parquet")
    return root, dataset


def user_args(output: Path, **overrides) -> SFTConfig:
    """What a user writes for a small CPU run; everything else is TRL's default (activation checkpointing on)."""
    settings = dict(output_dir=str(output), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                    model_init_kwargs={"trust_remote_code": True})
    return SFTConfig(**(settings | overrides))


def assert_loss_falls(history: list[dict]) -> None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 6
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3])


def test_user_sft_script_with_the_checkpoint_path(checkpoint):
    """`SFTTrainer(model="<checkpoint>")`: trains; TRL adds no balancing loss of its own; the routers balance
    themselves (their biases move, and the trained model routes no less evenly than the one it started from)."""
    root, dataset = checkpoint
    trainer = SFTTrainer(model=str(root / "model"), args=user_args(root / "user-sft"), train_dataset=dataset)
    trainer.train()
    history = trainer.state.log_history
    assert_loss_falls(history)
    assert not any("aux_loss" in entry for entry in history)
    assert all(block.router.e_score_correction_bias.abs().sum() > 0 for block in trainer.model.moe_blocks())

    def imbalance(model) -> float:
        """Mean over MoE layers and modalities of the most loaded expert's share over the mean share."""
        stats = RoutingStatistics(model.config)
        handles = stats.track(model)
        processor = AutoProcessor.from_pretrained(root / "model")
        prompts = [processor.apply_chat_template(prompt, add_generation_prompt=True) for prompt in dataset["prompt"]]
        with torch.no_grad():
            images = [row_images[0] for row_images in dataset["images"]]
            model.eval()(**processor(images=images, text=prompts, padding=True, return_tensors="pt"))
        for handle in handles:
            handle.remove()
        values = [entry[modality]["imbalance"] for entry in stats.summary() for modality in ("image", "text")]
        return sum(values) / len(values)

    start = AutoModelForImageTextToText.from_pretrained(root / "model", trust_remote_code=True)
    assert imbalance(trainer.model) <= imbalance(start) + 0.05


def test_trl_sft_command_line(checkpoint):
    """`trl sft --model_name_or_path <checkpoint> --trust_remote_code --dataset_name <folder>` trains and saves a
    checkpoint that loads with its remote code."""
    root, _ = checkpoint
    output = root / "trl-cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "trl"), "sft", "--model_name_or_path", str(root / "model"),
         "--trust_remote_code", "--dataset_name", str(root / "parquet"), "--output_dir", str(output),
         "--max_steps", "8", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--logging_steps", "1",
         "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--bf16", "false"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{'loss'")]  # printed logs
    assert_loss_falls([{"loss": float(entry["loss"])} for entry in logged])
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "AsyMoEForConditionalGeneration"


def test_user_lora_on_the_experts_trains_and_merges(checkpoint):
    """A user's own LoRA: attention projections plus the fused experts through PEFT `target_parameters`; the merged
    model saves as a checkpoint that loads with its remote code and computes what the adapted model computed."""
    root, dataset = checkpoint
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    trainer = SFTTrainer(model=str(root / "model"), args=user_args(root / "user-lora", learning_rate=1e-2),
                         train_dataset=dataset, peft_config=lora)
    trainer.train()
    assert_loss_falls(trainer.state.log_history)
    trained = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert any("experts" in name for name in trained) and not any("router" in name for name in trained)

    processor = AutoProcessor.from_pretrained(root / "model")
    prompt = processor.apply_chat_template(dataset["prompt"][0], add_generation_prompt=True)
    inputs = processor(images=dataset["images"][0], text=prompt, return_tensors="pt")
    model = trainer.model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    processor.save_pretrained(root / "merged")
    assert (root / "merged" / "modeling_asymoe.py").is_file()  # a Hub bundle (loading it alone: test_hub_bundle.py)
    reloaded = AutoModelForImageTextToText.from_pretrained(root / "merged", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=1e-5, rtol=1e-4)


def test_a_trainer_side_balancing_loss_is_refused_with_the_reason(checkpoint):
    """Asking TRL for its Mixtral balancing loss (blind to the modality masks) stops at the first step with a message
    that says why and what to do; nothing reads a made-up expert count."""
    root, dataset = checkpoint
    trainer = SFTTrainer(model=str(root / "model"), args=user_args(root / "aux", router_aux_loss_coef=0.01),
                         train_dataset=dataset)
    with pytest.raises(AttributeError, match="no single `num_experts`.*router_bias_update_rate"):
        trainer.train()
    assert not hasattr(trainer.model.config.text_config, "num_experts")
