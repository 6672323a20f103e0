"""Supervised fine-tuning of AsyMoE (or any image-text-to-text model) with TRL's `SFTTrainer`.

    python -m asymoe.finetune.sft --config configuration/recipes/sft_tiny.yaml
    accelerate launch --config_file configuration/accelerate/ddp.yaml -m asymoe.finetune.sft --config ...

Data: `--dataset_name` is a `save_to_disk` directory (e.g. the grounding benchmark), a LLaVA JSON file or a local
data set directory; `--dataset_format` auto | messages | llava | vqa (see `asymoe.finetune.data`). Only assistant
tokens are trained (`assistant_only_loss=True` with the chat template's `{% generation %}` blocks). What trains:
`--freeze` none | moe | projector | vision; AsyMoE-specific parameters learn at `--asymoe_lr`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import Trainer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from .callbacks import RoutingCallback
from .data import FORMATS, load_training_data
from .optim import FREEZE_SCHEMES, apply_freezing, parameter_groups


@dataclass
class SFTScriptArguments(ScriptArguments):
    dataset_format: str = field(default="auto", metadata={"help": f"auto or one of {FORMATS}"})
    image_folder: str | None = field(default=None, metadata={"help": "folder relative image paths resolve against"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    freeze: str = field(default="none", metadata={"help": f"what stays frozen: one of {FREEZE_SCHEMES}"})
    asymoe_lr: float | None = field(
        default=None, metadata={"help": "learning rate of curvature, Möbius biases/scales, evidence readouts "
                                        "(default: --learning_rate)"})


class AsyMoESFTTrainer(SFTTrainer):
    """`SFTTrainer` that trains with the model's own loss (LM loss on labelled tokens + router aux/z losses), puts
    AsyMoE-specific parameters in their own optimizer group, applies a freezing scheme and logs routing."""

    def __init__(self, *args, freeze: str = "none", asymoe_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("peft_config") is None:
            apply_freezing(self.model, freeze)
        elif freeze != "none":
            raise ValueError("--freeze and --use_peft both decide what trains; use one of them.")
        self.asymoe_lr = asymoe_lr
        # First, so that the reporters (and the printed logs) see the routing scalars it adds.
        self.callback_handler.callbacks.insert(0, RoutingCallback())

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(model, self.args.learning_rate, self.args.weight_decay, self.asymoe_lr)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's fused LM head would bypass the model's forward, and with it the per-modality load-balancing loss
        # (its Mixtral-style loss assumes one expert count in every layer): use the model's own loss instead.
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        predicted = outputs.logits[:, :-1].argmax(-1)
        correct, total = self.accelerator.gather_for_metrics(
            torch.stack([(predicted.eq(labels) & mask).sum(), mask.sum()]).reshape(1, 2)).sum(0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / total.clamp(min=1)).item())
        if getattr(outputs, "aux_loss", None) is not None:
            aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach().reshape(1))
            self._metrics[mode]["aux_loss"].append(aux.mean().item())
        return (loss, outputs) if return_outputs else loss


def main(argv: list[str] | None = None) -> AsyMoESFTTrainer:
    """Run the script (`argv` as on the command line); returns the trainer after training and saving."""
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if script_args.dataset_name is None:
        parser.error("--dataset_name is required (a save_to_disk directory, a LLaVA JSON file or a data set folder)")
    training_args.max_length = None  # truncation would cut image placeholders
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        **({"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}),
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    dataset = load_training_data(script_args.dataset_name, script_args.dataset_train_split,
                                 script_args.dataset_format, script_args.image_folder)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    trainer = AsyMoESFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
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
