"""Supervised fine-tuning of AsyMoE (or any image-text-to-text model) with TRL's `SFTTrainer`.

    python -m asymoe.finetune.sft --config configuration/recipes/sft_tiny.yaml
    accelerate launch --config_file configuration/accelerate/ddp.yaml -m asymoe.finetune.sft --config ...

Data: `--dataset_name` is a `save_to_disk` directory (e.g. the grounding benchmark), a LLaVA JSON file, a local
data set folder or a Hub data set (`--dataset_config`); `--dataset_format` auto | messages | llava | vqa (see
`asymoe.finetune.data`). Only assistant tokens are trained (`assistant_only_loss=True` with the chat template's
`{% generation %}` blocks). What trains: `--freeze` none | moe | projector | vision, or `--use_peft` (LoRA where
`asymoe.finetune.lora.lora_config` says: `--lora_targets`, `--lora_train_routers`, `--lora_evidence`);
AsyMoE-specific parameters learn at `--asymoe_lr`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from .callbacks import RoutingCallback
from .data import FORMATS, DataScriptArguments, load_training_data
from .lora import LoraScriptArguments, script_peft
from .optim import FREEZE_SCHEMES, apply_freezing, separate_asymoe_groups, without_asymoe_decay


@dataclass
class SFTScriptArguments(ScriptArguments, DataScriptArguments, LoraScriptArguments):
    dataset_format: str = field(default="auto", metadata={"help": f"auto or one of {FORMATS}"})
    freeze: str = field(default="none", metadata={"help": f"what trains: one of {FREEZE_SCHEMES}"})
    asymoe_lr: float | None = field(
        default=None, metadata={"help": "learning rate of curvature, Möbius biases/scales and evidence readouts "
                                        "(default: --learning_rate)"})


class AsyMoESFTTrainer(SFTTrainer):
    """Stock `SFTTrainer` (its loss and fused LM head; AsyMoE balances its experts without a loss term) plus a
    freezing scheme, AsyMoE-specific parameters in their own optimizer groups and the routing log."""

    def __init__(self, *args, freeze: str = "none", asymoe_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("peft_config") is None:
            apply_freezing(self.model, freeze)
        elif freeze != "none":
            raise ValueError("--freeze and --use_peft both decide what trains; use one of them.")
        self.asymoe_lr = asymoe_lr
        # First, so that the reporters (and the printed logs) see the routing scalars it adds.
        self.callback_handler.callbacks.insert(0, RoutingCallback())

    def get_decay_parameter_names(self, model) -> list[str]:
        return without_asymoe_decay(super().get_decay_parameter_names(model))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            separate_asymoe_groups(self.optimizer, self.model if model is None else model,
                                   self.args.learning_rate if self.asymoe_lr is None else self.asymoe_lr)
        return self.optimizer


def main(argv: list[str] | None = None) -> AsyMoESFTTrainer:
    """Run the script (`argv` as on the command line); returns the trainer after training and saving."""
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if script_args.dataset_name is None:
        parser.error("--dataset_name is required (a save_to_disk directory, a LLaVA JSON file or a data set)")
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    training_args.max_length = None  # truncation would cut image placeholders
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        **({"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}),
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    peft_config, quantization = script_peft(parser, script_args, model_args, training_args.trust_remote_code)
    dataset = load_training_data(script_args.dataset_name, script_args.dataset_train_split,
                                 script_args.dataset_format, script_args.image_folder, script_args.dataset_config)
    dataset = script_args.first_train_rows(dataset)
    trainer = AsyMoESFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        peft_config=peft_config,
        quantization_config=quantization,
        freeze=script_args.freeze,
        asymoe_lr=script_args.asymoe_lr,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        accelerator = trainer.accelerator
        print(f"trained {trainer.state.global_step} steps ({accelerator.distributed_type.value}, world size "
              f"{accelerator.num_processes}); saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
