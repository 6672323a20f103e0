"""PEFT LoRA / QLoRA recipes for AsyMoE, and merging adapters back into a Hub checkpoint.

What `lora_config` adapts, in the language model only (the vision tower, projector, embeddings and LM head stay
frozen):
- `attention`: LoRA on the decoder's `q_proj`, `k_proj`, `v_proj`, `o_proj` (named explicitly: "all-linear" would
  also hit the routers, the evidence readouts and the vision tower);
- `mlp`: LoRA on the dense SwiGLU FFNs of the non-MoE layers;
- `experts`: LoRA on the fused 3-D expert weights `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` through PEFT's
  `target_parameters` (one low-rank pair per expert; PEFT cannot apply dropout there, so `dropout` must be 0).

AsyMoE's own parameters:
- routers: frozen (the routing the base learned is kept), or trained fully (`modules_to_save`) with
  `train_routers=True`;
- evidence readouts (query/output projections and the reliance gate of the evidence-priority experts):
  `evidence="lora"` (default) puts LoRA on the two projections and trains the tiny gate fully; `"full"` trains the
  whole readout; `"frozen"` keeps it. An upcycled model's readout starts switched off (W_o = 0): freezing it there
  leaves the evidence experts reading plain hidden states;
- hyperbolic parameters of the inter experts (Möbius biases, scales, curvature) stay frozen: PEFT can only save
  whole modules, and the module that holds them is the fused experts, which LoRA already adapts. Their LoRA deltas
  still pass through the Möbius maps, so the adapted inter experts stay hyperbolic.

QLoRA (`quantization_config`) needs a CUDA GPU and bitsandbytes: it quantizes the `nn.Linear` layers of the decoder
and vision tower; the fused experts are `nn.Parameter`s, which bitsandbytes leaves in the compute dtype.

The SFT and DPO scripts build their adapters with `script_peft` (`--use_peft`, `--lora_targets`, ...).

    asymoe merge-lora BASE ADAPTER OUTPUT    # BASE + adapter -> a plain checkpoint that loads with remote code
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

from ..io import atomic_directory

LORA_TARGETS = ("attention", "mlp", "experts")
EVIDENCE_MODES = ("lora", "full", "frozen")
_LAYERS = r".*language_model\.layers\.\d+\."
_PATTERNS = {
    "attention": _LAYERS + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "mlp": _LAYERS + r"mlp\.(gate_proj|up_proj|down_proj)",
    "evidence": _LAYERS + r"mlp\.evidence\.(q_proj|o_proj)",
}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _text_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    text_config = config.get_text_config()
    if not hasattr(text_config, "moe_layers"):
        raise ValueError(f"lora_config is for AsyMoE models; got a {text_config.model_type!r} config. Use "
                         "peft.LoraConfig directly for other models.")
    return text_config


def parse_targets(targets: str) -> list[str]:
    """"attention+experts" -> ["attention", "experts"], checked against `LORA_TARGETS`."""
    parts = [part.strip() for part in targets.split("+") if part.strip()]
    unknown = [part for part in parts if part not in LORA_TARGETS]
    if not parts or unknown:
        raise ValueError(f"unknown LoRA targets {unknown or [targets]}: join some of {LORA_TARGETS} with '+' "
                         "(e.g. 'attention+experts').")
    return list(dict.fromkeys(parts))


def lora_config(
    model_or_config: PreTrainedModel | PretrainedConfig,
    targets: str = "attention+experts",
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    train_routers: bool = False,
    evidence: str = "lora",
    **lora_kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` for an AsyMoE model (the model or its config).

    Args:
        targets: '+'-joined parts of the language model to adapt, from `LORA_TARGETS` (see the module docstring).
            Parts the model does not have (experts of a dense model) are an error.
        rank, alpha: LoRA rank and alpha; each expert gets its own rank-`rank` pair.
        dropout: LoRA dropout; must be 0 when `experts` is targeted.
        train_routers: train the routers fully (saved with the adapter) instead of freezing them.
        evidence: the evidence readouts: "lora", "full" or "frozen".
        lora_kwargs: further `LoraConfig` fields (`use_rslora`, `init_lora_weights`, ...).
    """
    text_config = _text_config(model_or_config)
    parts = parse_targets(targets)
    if evidence not in EVIDENCE_MODES:
        raise ValueError(f"unknown evidence mode {evidence!r}; use one of {EVIDENCE_MODES}.")
    has_moe, has_evidence = bool(text_config.moe_layers), bool(getattr(text_config, "evidence_layers", None))
    has_dense = len(text_config.moe_layers) < text_config.num_hidden_layers
    if "experts" in parts and not has_moe:
        raise ValueError("LoRA target 'experts' but the model has no MoE layers (dense variant): drop 'experts'.")
    if "mlp" in parts and not has_dense:
        raise ValueError("LoRA target 'mlp' but every layer is an MoE layer: use 'experts' instead.")
    if train_routers and not has_moe:
        raise ValueError("train_routers=True but the model has no MoE layers (dense variant) and so no routers.")
    if "experts" in parts and dropout:
        raise ValueError(f"lora dropout {dropout} with LoRA on the experts: PEFT cannot apply dropout to the fused "
                         "expert weights (target_parameters); set the dropout to 0 (--lora_dropout 0).")

    patterns = [_PATTERNS[part] for part in parts if part != "experts"]
    modules_to_save = ["router"] if train_routers else []
    if has_evidence and evidence == "lora":
        patterns.append(_PATTERNS["evidence"])
        modules_to_save.append("evidence.gate")
    elif has_evidence and evidence == "full":
        modules_to_save.append("evidence")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A regex (full match on module names) or None: PEFT reads a list as name suffixes.
        target_modules="|".join(f"(?:{p})" for p in patterns) if patterns else None,
        target_parameters=EXPERT_PARAMETERS if "experts" in parts else None,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )


@dataclass
class LoraScriptArguments:
    """The TRL scripts' choice of what LoRA adapts in an AsyMoE model (`--use_peft`; rank, alpha, dropout and rsLoRA
    are TRL's `--lora_r`, `--lora_alpha`, `--lora_dropout`, `--use_rslora`)."""

    lora_targets: str = field(default="attention+experts", metadata={
        "help": f"with --use_peft: '+'-joined parts to adapt, from {LORA_TARGETS}"})
    lora_train_routers: bool = field(default=False, metadata={"help": "with --use_peft: train the routers fully"})
    lora_evidence: str = field(default="lora", metadata={
        "help": f"with --use_peft: the evidence readouts, one of {EVIDENCE_MODES}"})


def script_peft(parser: argparse.ArgumentParser, script_args: LoraScriptArguments, model_args,
                trust_remote_code: bool) -> tuple[LoraConfig | None, BitsAndBytesConfig | None]:
    """`(peft_config, quantization_config)` for a TRL script's trainer from its flags (TRL's `ModelConfig` as
    `model_args`): without `--use_peft` none; for AsyMoE models `lora_config`, for other models TRL's own
    (`--lora_target_modules`); QLoRA with `--load_in_4bit` / `--load_in_8bit`. Usage errors exit via `parser.error`."""
    from transformers import AutoConfig
    from trl import get_peft_config

    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if not model_args.use_peft:
        if quantized:
            parser.error("--load_in_4bit / --load_in_8bit train adapters on a quantized model: add --use_peft")
        return None, None
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type != "asymoe":
        peft_config = get_peft_config(model_args)
    elif model_args.lora_target_modules or model_args.lora_target_parameters:
        parser.error("choose what LoRA adapts in AsyMoE with --lora_targets (parts of AsyMoE), not "
                     "--lora_target_modules / --lora_target_parameters")
    else:
        try:
            peft_config = lora_config(config, script_args.lora_targets, rank=model_args.lora_r,
                                      alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                                      train_routers=script_args.lora_train_routers, evidence=script_args.lora_evidence,
                                      use_rslora=model_args.use_rslora)
        except ValueError as err:
            parser.error(str(err))
    return peft_config, quantization_config(4 if model_args.load_in_4bit else 8) if quantized else None


def quantization_config(bits: int = 4, compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig:
    """QLoRA's `BitsAndBytesConfig` (NF4 with double quantization for 4 bits, LLM.int8 for 8) for loading an AsyMoE
    model. GPU only: needs CUDA and `pip install bitsandbytes`.

    The LM head (TRL reads its weight directly), the projector and the evidence readouts stay unquantized; the
    routers and fused experts are parameters, not `nn.Linear`s, and bitsandbytes leaves them in `compute_dtype`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: bitsandbytes quantizes to 4 or 8 bits.")
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes); on this machine use plain LoRA (no --load_in_4bit "
                           "/ --load_in_8bit).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("QLoRA needs bitsandbytes: pip install bitsandbytes") from err
    skip = ["lm_head", "multi_modal_projector", "evidence", "router"]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
               dtype: str = "auto") -> Path:
    """Load `base`, apply the adapter in `adapter`, merge it into the weights and save a checkpoint (weights, config,
    processor, remote code) to `output`, written into a temporary sibling first and then moved into place."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty: choose a new output directory or delete it.")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no PEFT adapter (adapter_config.json): give the directory that "
                                "the LoRA training saved.")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, trust_remote_code=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # The adapter directory holds the processor when a trainer saved it there; otherwise take the base's.
    has_processor = (Path(adapter) / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(adapter if has_processor else base, trust_remote_code=True)

    with atomic_directory(output) as temporary:
        merged.save_pretrained(temporary)
        processor.save_pretrained(temporary)
    return output


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe merge-lora BASE ADAPTER OUTPUT`'s arguments, on `parser` (the `asymoe` subcommand's) or a new one."""
    parser = parser or argparse.ArgumentParser(prog="asymoe merge-lora", description=__doc__)
    parser.add_argument("base", help="base checkpoint (directory or Hub id) the adapter was trained on")
    parser.add_argument("adapter", help="directory of the PEFT adapter (adapter_config.json)")
    parser.add_argument("output", help="new directory for the merged checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype to load, merge and save in (auto: the base checkpoint's)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Merge a LoRA adapter into its base AsyMoE checkpoint and save a checkpoint that loads with remote code."""
    try:
        output = merge_lora(args.base, args.adapter, args.output, args.dtype)
    except (FileExistsError, FileNotFoundError, OSError, ValueError) as err:
        print(f"asymoe merge-lora: error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base}: {output}")
    return 0
