"""Direct preference optimisation of AsyMoE with TRL's `DPOTrainer`, on image + preference-pair data.

    python -m asymoe.finetune.dpo --config configuration/recipes/dpo_tiny.yaml \\
        --model_name_or_path outputs/sft --dataset_name outputs/demo/data/grounding --output_dir outputs/dpo
    accelerate launch --config_file configuration/accelerate/ddp.yaml -m asymoe.finetune.dpo --config ...

Data (`--dataset_name`: a `save_to_disk` directory, a JSON/JSONL file, a local data set directory or a Hub data set
with `--dataset_config`; `--dataset_format`):
- `preference`: `prompt`, `chosen`, `rejected` and `images` (a list) or `image`; plain strings (prompts with
  `<image>` placeholders, or without: the images then come first) or TRL's conversational messages;
- `grounding`: the grounding benchmark (`asymoe grounding`): chosen = the answer the image supports, rejected = the
  answer of the training split's language prior; rows where the two agree are left out.
Prompts go through the processor's chat template (LLaVA-1.5 for AsyMoE), as in SFT and evaluation.

`--use_peft` puts LoRA where `asymoe.finetune.lora.lora_config` says (`--lora_targets`, `--lora_train_routers`,
`--lora_evidence`; `--lora_dropout` must be 0 with experts; other models: TRL's `--lora_target_modules`); the
reference model is then the base with the adapter disabled. `--load_in_4bit` / `--load_in_8bit` (QLoRA) need a CUDA
GPU and bitsandbytes.

MoE load balancing needs no trainer-side loss: AsyMoE's routers balance themselves while they train (auxiliary-loss
free, `router_bias_update_rate`), and `router_aux_loss_coef` is 0, so TRL adds none of its own.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser

from ..eval.grounding import prior_answer
from .data import (
    DataScriptArguments,
    convert_rows,
    default_image_folder,
    image_storage,
    llava_messages,
    load_split,
    vqa_messages,
)
from .lora import LoraScriptArguments, script_peft

PREFERENCE_FORMATS = ("preference", "grounding")


@dataclass
class DPOScriptArguments(ScriptArguments, DataScriptArguments, LoraScriptArguments):
    dataset_format: str = field(default="auto", metadata={"help": f"auto or one of {PREFERENCE_FORMATS}"})


def detect_preference_format(column_names: list[str]) -> str:
    if {"prompt", "chosen", "rejected"} <= set(column_names):
        return "preference"
    if {"question", "answer", "question_type", "scene"} <= set(column_names):
        return "grounding"
    raise ValueError(f"cannot tell the preference data format from the columns {column_names}: expected `prompt`/"
                     "`chosen`/`rejected` (+ `images` or `image`) or the grounding benchmark.")


def _user_turn(prompt: str, num_images: int) -> list[dict]:
    """A plain prompt as one user message; without `<image>` placeholders the images come first (LLaVA)."""
    if "<image>" not in prompt:
        prompt = "<image>\n" * num_images + prompt
    return llava_messages([{"from": "human", "value": prompt}])


def _reply(completion) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": [{"type": "text", "text": completion}]}]
    return completion


def to_preferences(dataset, data_format: str = "auto", image_folder: str | None = None):
    """Map a `datasets.Dataset` to TRL's conversational vision preference rows: `prompt`, `chosen`, `rejected`
    (message lists) and `images`."""
    data_format = detect_preference_format(dataset.column_names) if data_format == "auto" else data_format
    if data_format not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {data_format!r}; use one of {PREFERENCE_FORMATS} or 'auto'.")
    columns = ["prompt", "chosen", "rejected", "images"]

    if data_format == "grounding":
        def convert(row):
            main = json.loads(row["scene"])
            obj = main["objects"][main["main"]]
            rejected = prior_answer(row["question_type"], obj["shape"], obj["colour"])
            return {"prompt": vqa_messages(row["question"]), "chosen": _reply(row["answer"]),
                    "rejected": _reply(rejected), "images": [image_storage(row["image"])],
                    "keep": rejected != row["answer"]}

        converted = convert_rows(dataset, convert, "to preferences")
        return converted.filter(lambda keep: keep, input_columns="keep").select_columns(columns)

    if "images" not in dataset.column_names and "image" not in dataset.column_names:
        raise ValueError("vision preference data needs an `images` (list) or `image` column.")

    def convert(row):
        images = row["images"] if "images" in row else [row["image"]]
        images = [image_storage(image, image_folder) for image in images if image is not None]
        prompt = row["prompt"]
        return {"prompt": _user_turn(prompt, len(images)) if isinstance(prompt, str) else prompt,
                "chosen": _reply(row["chosen"]), "rejected": _reply(row["rejected"]), "images": images}

    return convert_rows(dataset, convert, "to preferences")


def load_preference_data(path: str, split: str = "train", data_format: str = "auto", image_folder: str | None = None,
                         name: str | None = None):
    """`asymoe.finetune.data.load_split` (any source) + `to_preferences`."""
    return to_preferences(load_split(path, split, name), data_format, default_image_folder(path, image_folder))


def main(argv: list[str] | None = None) -> DPOTrainer:
    """Run the script (`argv` as on the command line); returns the trainer after training and saving."""
    parser = TrlParser((DPOScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if script_args.dataset_name is None:
        parser.error("--dataset_name is required (a save_to_disk directory, a JSON file or a data set folder)")
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        **({"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}),
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    peft_config, quantization = script_peft(parser, script_args, model_args, training_args.trust_remote_code)
    dataset = load_preference_data(script_args.dataset_name, script_args.dataset_train_split,
                                   script_args.dataset_format, script_args.image_folder, script_args.dataset_config)
    dataset = script_args.first_train_rows(dataset)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_preference_data(script_args.dataset_name, script_args.dataset_test_split,
                                            script_args.dataset_format, script_args.image_folder,
                                            script_args.dataset_config)
    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        quantization_config=quantization,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        accelerator = trainer.accelerator
        print(f"trained {trainer.state.global_step} DPO steps ({accelerator.distributed_type.value}, world size "
              f"{accelerator.num_processes}); saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
