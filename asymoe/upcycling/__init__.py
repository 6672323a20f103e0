"""Upcycle dense LLaVA checkpoints into AsyMoE (DESIGN §3): `upcycle(SRC, DST)` and `asymoe upcycle SRC DST`.

The vision tower, projector, embeddings, attention, norms and LM head are copied; in every MoE layer each expert is
initialised from the dense FFN of that layer:

- `mode="copy"`: every expert (all groups) is the dense FFN, `gate_up_proj[e] = cat[gate_proj, up_proj]`,
  `down_proj[e] = down_proj`. Routers start random-small, Möbius biases and the evidence readout's `W_o` at zero.
  The top-k weights of a token sum to 1 and all experts it can reach are the same function, so the upcycled model
  computes the dense model's logits (function-preserving, whatever the router says).
- `mode="partition"`: the dense FFN's intermediate neurons are cut into `num_slices` equal slices and each expert
  takes one (`moe_intermediate_size = intermediate_size / num_slices`): fewer activated parameters; needs training.

Optional `noise_std` (Gaussian noise relative to each matrix's std) and `drop_ratio` (Drop-Upcycling: re-initialise
that fraction of each expert's neurons) diversify the experts; both break function preservation.

Streaming: the output shards are created up front at their final size, with headers computed from the target model's
shapes; the source shards are then read one at a time and every output tensor is written at its offset as soon as it
is known. Tensors that are copied unchanged go file to file (`os.copy_file_range`, never through Python memory); a
MoE layer's dense FFN is read (`pread`, no memory map) and held until its three matrices have been seen, then
expanded expert by expert. Peak memory is therefore about one layer's FFN plus one expert above the imports, far below
one source shard, never two models. Everything is written into a temporary directory next to the output and moved
into place with one `os.replace` at the end: a crash leaves no valid-looking checkpoint at the destination.

Supported sources: transformers `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` and
`LlavaOnevisionForConditionalGeneration` checkpoints (any key layout transformers has used) with a Llama, Mistral,
Qwen2 or Qwen3 language model and a CLIP or SigLIP vision tower. LLaVA-NeXT / OneVision sources keep their anyres
image features (tiles, unpadding, `image_newline`, OneVision's `vision_aspect_ratio` pooling); OneVision videos are
not supported (image inputs only).

One module per job: `source` (resolving and mapping the source), `safetensors_io` (reading and the streaming writer),
`plan` (source tensor -> target tensor), `experts` (expert construction), `processor` (processor conversion), `card`
(parameter counts, model card), `core` (`upcycle`: orchestration and atomic publish), `report` (the deviation report).
"""

from .card import model_parameter_counts, parameter_counts
from .core import CRASH_HOOK_ENV, upcycle
from .plan import normalise_key
from .processor import convert_processor
from .report import (
    compare_states,
    deviation_report,
    format_deviation_report,
    model_states,
    probe_inputs,
    report_from_checkpoints,
)
from .source import (
    MODES,
    SOURCE_ARCHITECTURES,
    asymoe_config_from_llava,
    load_source_config,
    partition_slices,
    resolve_source,
)

__all__ = [
    "CRASH_HOOK_ENV",
    "MODES",
    "SOURCE_ARCHITECTURES",
    "asymoe_config_from_llava",
    "compare_states",
    "convert_processor",
    "deviation_report",
    "format_deviation_report",
    "load_source_config",
    "model_parameter_counts",
    "model_states",
    "normalise_key",
    "parameter_counts",
    "partition_slices",
    "probe_inputs",
    "report_from_checkpoints",
    "resolve_source",
    "upcycle",
]
