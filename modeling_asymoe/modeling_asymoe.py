"""AsyMoE: a LLaVA-style vision-language model whose decoder FFNs are asymmetric mixture-of-experts blocks.

Per MoE layer one fp32 router scores all experts; a token reaches only its modality's groups:
image tokens -> {vision-intra, inter}; text tokens -> {text-intra, inter, evidence}. Top-k, renormalised, dropless.
All experts of a layer live in one fused pair of 3-D weights (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`,
groups stored in the order vision, text, inter, evidence). Inter-modality experts add Möbius biases after each of
their two projections (hyperbolic_asymoe.py); evidence-priority experts read `h + g * W_o r`, where r attends over
the evidence (image) positions of the layer's own keys/values.

This file is part of the Hub bundle: it imports only torch, transformers and its bundle siblings.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.moe import ExpertsInterface, _grouped_linear, use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..configuration.configuration_asymoe import (
    AnyresLayout,
    AsyMoEConfig,
    AsyMoETextConfig,
    ExpertLayout,
    anyres_layout,
    write_remote_code,
)
from .hyperbolic_asymoe import mobius_bias_, mobius_bias_row_

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (in `generate`'s calls to `forward`, in output
# fields, in the mask helpers and in the gradient-checkpointing guard). Every forward here accepts both names; calls
# into transformers and the outputs use the installed release's name, so no release sees a deprecated one.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache, given under its transformers >= 5.24 name `cache` or its older name `past_key_values`."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(
            "Two different KV caches were given: pass it once, as `cache` (older name: `past_key_values`)."
        )
    return cache if cache is not None else past_key_values


class AsyMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class AsyMoERotaryEmbedding(nn.Module):
    """RoPE with every scaling type transformers knows (`config.rope_parameters["rope_type"]`)."""

    def __init__(self, config: AsyMoETextConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: AsyMoETextConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, head_dim] by the RoPE angles `cos`/`sin` [batch, seq, head_dim]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * n_rep, seq, dim] (grouped-query attention)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, dim = hidden_states.shape
    return hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, dim).reshape(batch, kv_heads * n_rep, seq, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class AsyMoEAttention(nn.Module):
    """Llama attention with the Qwen2 qkv bias, Qwen3 qk-norm and Mistral sliding-window flags.

    Returns the layer's full keys/values (cache included) as well, for the evidence-priority experts.
    """

    def __init__(self, config: AsyMoETextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        if config.use_qk_norm:
            self.q_norm = AsyMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = AsyMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.sliding_window = config.sliding_window

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.config.use_qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = apply_rotary(query.transpose(1, 2), cos, sin), apply_rotary(key.transpose(1, 2), cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights, (key, value)


class AsyMoEMLP(nn.Module):
    """Dense SwiGLU FFN (the decoder's non-MoE layers, and the `dense` variant)."""

    def __init__(self, config: AsyMoETextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def reach_masks(layout: ExpertLayout, device: torch.device | str) -> torch.Tensor:
    """[2, E] bool: the experts image tokens (row 0) and text tokens (row 1) may route to (`ExpertLayout.reachable`).

    Built from the layout, not kept as a buffer (meta-device loading leaves buffers uninitialised); eager calls share
    one read-only copy per layout and device.
    """
    if torch.compiler.is_compiling():
        return _build_reach_masks(layout, torch.device(device))
    return _shared_reach_masks(layout, torch.device(device))


def _build_reach_masks(layout: ExpertLayout, device: torch.device) -> torch.Tensor:
    reachable = [set(layout.reachable(modality)) for modality in ("image", "text")]
    return torch.tensor([[e in experts for e in range(layout.num_experts)] for experts in reachable], device=device)


@functools.lru_cache(maxsize=256)
def _shared_reach_masks(layout: ExpertLayout, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # an inference-mode tensor could not serve a later forward under autograd
        return _build_reach_masks(layout, device)


def select_experts(
    logits: torch.Tensor, reachable: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing rule, in one place (the router, its losses and its statistics all use it).

    logits [N, E] fp32, reachable [N, E] bool, bias [N, E] -> masked logits [N, E] (-inf where unreachable: their
    softmax is the routing probabilities), top-k weights [N, k] and expert ids [N, k]. The experts are the top-k of
    logit + bias (the load-balancing bias steers the choice only, as in DeepSeek-V3); their weights are their
    probabilities renormalised over the k chosen.
    """
    masked = logits.masked_fill(~reachable, float("-inf"))
    # Top-k of the masked logits, not of probs: where exp underflows (logit gaps > ~100), reachable experts tie with
    # unreachable ones at probability 0 and top-k could pick an unreachable expert.
    top_index = torch.topk(masked + bias, top_k, dim=-1).indices
    top_weights = F.softmax(logits.gather(-1, top_index), dim=-1)  # = probs of the chosen, renormalised
    return masked, top_weights, top_index


class AsyMoERouter(nn.Module):
    """fp32 router over all experts of a layer; each token reaches only its modality's experts (`select_experts`).

    `e_score_correction_bias` [2, E] (row 0 for image tokens, row 1 for text tokens) balances expert loads without a
    loss (DeepSeek-V3's auxiliary-loss-free balancing): while the router trains, every forward records which experts
    it chose (`record_load`, padding excluded) and after each optimizer step the bias of every reachable expert moves
    by `router_bias_update_rate` towards its modality's mean load. The bias is saved with the weights.
    """

    def __init__(self, config: AsyMoETextConfig, layout: ExpertLayout):
        super().__init__()
        self.layout = layout
        self.top_k = config.num_experts_per_tok
        self.num_experts = layout.num_experts
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.zeros(layout.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(2, layout.num_experts, dtype=torch.float32))
        self.pending_load: torch.Tensor | None = None  # [2, E] selections since the last optimizer step
        self.creation_index = next(_ROUTER_COUNTER)  # the same on every rank: orders the loads' all-reduce

    def forward(
        self, hidden_states: torch.Tensor, image_mask: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [N, H], image_mask [N] bool, token_mask [N] bool (non-padding; `None`: all) -> router
        logits [N, E] (fp32), top-k weights [N, k], top-k expert ids [N, k]."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        modality = (~image_mask).long()
        reachable = reach_masks(self.layout, logits.device)[modality]
        _, top_weights, top_index = select_experts(
            logits, reachable, self.e_score_correction_bias[modality], self.top_k
        )
        if self.training and self.bias_update_rate and self.weight.requires_grad and torch.is_grad_enabled():
            self.record_load(top_index, modality, token_mask)
        return logits, top_weights, top_index

    @torch.compiler.disable
    @torch.no_grad()
    def record_load(self, top_index: torch.Tensor, modality: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Count this forward's choices (non-padding tokens) towards the loads of the running optimizer step. A
        gradient-checkpointing recompute counts them twice, which leaves the sign rule's balance unchanged."""
        counted = torch.ones_like(top_index, dtype=torch.float32)
        if token_mask is not None:
            counted = counted * token_mask.reshape(-1, 1).to(counted)
        if self.pending_load is None:
            self.pending_load = counted.new_zeros(2, self.num_experts)
        rows = modality.reshape(-1, 1).expand_as(top_index)
        self.pending_load.index_put_((rows, top_index), counted, accumulate=True)
        _watch_load(self)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """One balancing step from `load` [2, E]: per modality, the bias of each reachable expert rises by the update
        rate when its load is below the mean load of those experts, falls when above."""
        reach = reach_masks(self.layout, load.device)
        for row in range(2):
            counts = load[row][reach[row]]
            if counts.sum() > 0:  # tokens of this modality were routed
                step = self.bias_update_rate * torch.sign(counts.mean() - counts)
                self.e_score_correction_bias[row, reach[row]] += step.to(self.e_score_correction_bias)


_ROUTER_COUNTER = itertools.count()
_ROUTERS_WITH_LOAD: weakref.WeakSet[AsyMoERouter] = weakref.WeakSet()
_optimizer_hook = None


def _watch_load(router: AsyMoERouter) -> None:
    """Have the next optimizer step (any optimizer: the hook is global) update `router`'s bias."""
    global _optimizer_hook
    _ROUTERS_WITH_LOAD.add(router)
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_update_router_biases)


def _update_router_biases(optimizer, args, kwargs) -> None:
    """After an optimizer step: update every router that recorded loads since the previous step. Under
    `torch.distributed` the loads of all ranks are summed first (every rank steps, so every rank joins)."""
    routers = sorted(_ROUTERS_WITH_LOAD, key=lambda router: router.creation_index)
    _ROUTERS_WITH_LOAD.clear()
    if not routers:
        return
    device = routers[0].pending_load.device
    loads = torch.cat([router.pending_load.to(device).reshape(-1) for router in routers])  # layers differ in E
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for router, load in zip(routers, loads.split([router.pending_load.numel() for router in routers])):
        router.update_bias(load.view(2, -1).to(router.e_score_correction_bias.device))
        router.pending_load = None


class AsyMoEExpertsMixin:
    """Pieces every experts implementation shares: per-row inputs and the hyperbolic maps of the inter group."""

    def expert_inputs(
        self, hidden_states: torch.Tensor, evidence_states: torch.Tensor | None, token_idx: torch.Tensor,
        expert_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Rows fed to the experts: evidence experts read the evidence-augmented state, the others the hidden state."""
        rows = hidden_states[token_idx]
        if evidence_states is None or self.layout.num_evidence == 0:
            return rows
        is_evidence = (expert_ids >= self.evidence_start).unsqueeze(-1)
        return torch.where(is_evidence, evidence_states[token_idx].to(rows.dtype), rows)

    def hyperbolic_(self, out: torch.Tensor, expert_ids: torch.Tensor, which: str, inter_rows: slice | None) -> None:
        """Apply the Möbius bias of projection `which` ("gate_up" or "down") in place to the rows of inter experts:
        `out[start:stop]` where the caller knows them (rows sorted by expert, eager), else every row, with the
        identity for the other groups (no host sync: compiled graphs, unsorted rows)."""
        if not self.is_hyperbolic or (inter_rows is not None and inter_rows.start == inter_rows.stop):
            return
        if inter_rows is None:
            inter_rows, relative = slice(None), expert_ids - self.inter_start
            index = torch.where((relative >= 0) & (relative < self.layout.num_inter), relative, -1)
        else:
            index = expert_ids[inter_rows] - self.inter_start
        beta = self.mobius_bias_gate_up if which == "gate_up" else self.mobius_bias_down
        scale = (self.log_scale_gate_up if which == "gate_up" else self.log_scale_down).exp()
        config = self.config
        mobius_bias_(out, beta, scale, self.curvature, config.manifold, config.mobius_residual, index, inter_rows)

    @property
    def curvature(self) -> torch.Tensor:
        return F.softplus(self.raw_curvature.float())

    def few_tokens_inference(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        evidence_states: torch.Tensor | None,
    ) -> torch.Tensor:
        """Eager CPU inference on a few tokens (decoding steps): the routing is read on the host once, then each
        (token, expert) pair runs through its expert's weights as views (no sort, histogram or weight copy) and the
        maps of inter experts run on the single row (`mobius_bias_row_`)."""
        maps = {}  # filled when the first inter expert is met: projection -> (bias table, scale, curvature, ...)

        def hyperbolic_row_(row, expert, which):
            if not (self.is_hyperbolic and self.inter_start <= expert < self.evidence_start):
                return
            if not maps:
                scale_gate_up, scale_down, c = torch.cat(
                    [self.log_scale_gate_up.exp(), self.log_scale_down.exp(), self.curvature]).tolist()
                config = self.config
                rest = (c, config.manifold, config.mobius_residual)
                maps.update(gate_up=(self.mobius_bias_gate_up, scale_gate_up, *rest),
                            down=(self.mobius_bias_down, scale_down, *rest))
            table, *scalars = maps[which]
            inter = expert - self.inter_start
            mobius_bias_row_(row, table[inter : inter + 1], *scalars)

        output = torch.zeros_like(hidden_states)
        for token, (experts, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.tolist())):
            rows = slice(token, token + 1)  # [1, H] views: 2-D projections run without reshapes
            for expert, weight in zip(experts, weights):
                reads_evidence = evidence_states is not None and expert >= self.evidence_start
                row = (evidence_states if reads_evidence else hidden_states)[rows].to(hidden_states.dtype)
                down = self.expert_ffn(row, lambda x, name, e=expert: F.linear(x, getattr(self, name)[e]),
                                       lambda out, which, e=expert: hyperbolic_row_(out, e, which))
                output[rows].add_(down, alpha=weight)
        return output

    def expert_ffn(self, rows: torch.Tensor, linear: Callable, map_: Callable) -> torch.Tensor:
        """SwiGLU of every row by its expert: `linear(x, weight_name)` does the (grouped) projections and
        `map_(out, which)` the Möbius maps of the inter experts' rows in place (`hyperbolic_`, `mobius_bias_row_`)."""
        gate_up = linear(rows, "gate_up_proj")
        map_(gate_up, "gate_up")
        gate, up = gate_up.chunk(2, dim=-1)
        down = linear(self.act_fn(gate) * up, "down_proj")
        map_(down, "down")
        return down


def asymoe_grouped_mm_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    evidence_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """One grouped GEMM per projection over all expert groups (rows sorted by expert, dropless). Eager, the Möbius
    maps run on the inter experts' rows only (their bounds read on the host); compiled, on every row (no sync).

    Calls of at most `config.experts_gather_max_tokens` tokens (decoding steps) skip the sort: compiled, they gather
    each token's expert weights (`batched_mm`; on a CPU, H 256, width 704, 5 experts, top-2, inductor: 0.60x the
    grouped GEMM's time at 1 token, 0.91x at 4, 1.45x at 8); eager inference runs each (token, expert) pair through
    its expert's weights on CPUs (`few_tokens_inference`; the eager gather was slower at every size, as it copies the
    weights it reads). That path reads the routing on the host; on GPUs, where each read stalls the launch queue, it
    is not used: the rule there is unmeasured (no GPU was available), see docs/performance.md.
    """
    num_tokens, top_k = top_k_index.shape
    if num_tokens <= self.config.experts_gather_max_tokens:
        if torch.compiler.is_compiling():
            return asymoe_batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights, evidence_states)
        if not torch.is_grad_enabled() and hidden_states.device.type == "cpu":
            return self.few_tokens_inference(hidden_states, top_k_index, top_k_weights, evidence_states)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    token_idx = perm // top_k
    rows = self.expert_inputs(hidden_states, evidence_states, token_idx, expert_ids)
    counts_input = expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(counts_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    inter_rows = None
    if self.is_hyperbolic and not torch.compiler.is_compiling():
        starts = [0, *offsets.tolist()]
        inter_rows = slice(starts[self.inter_start], starts[self.evidence_start])

    def linear(x, name):
        return _grouped_linear(x, getattr(self, name), offsets)

    out = self.expert_ffn(rows, linear, lambda out, which: self.hyperbolic_(out, expert_ids, which, inter_rows))
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(rows.dtype)
    unsorted = torch.empty_like(out)
    unsorted[perm] = out
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def asymoe_batched_mm_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    evidence_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gathers each (token, expert) pair's weights and runs batched matmuls (fast for few tokens, e.g. decoding)."""
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    token_idx = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(top_k)
    rows = self.expert_inputs(hidden_states, evidence_states, token_idx, expert_ids)

    def linear(x, name):
        return torch.bmm(getattr(self, name)[expert_ids], x.unsqueeze(-1)).squeeze(-1)

    out = self.expert_ffn(rows, linear, lambda out, which: self.hyperbolic_(out, expert_ids, which, None))
    out = out * top_k_weights.reshape(-1, 1).to(rows.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


class AsyMoEExpertsInterface(ExpertsInterface):
    """Experts implementations that know AsyMoE's groups (`experts_implementation=` "eager", "grouped_mm",
    "batched_mm")."""

    _global_mapping = {
        "grouped_mm": asymoe_grouped_mm_experts_forward,
        "batched_mm": asymoe_batched_mm_experts_forward,
    }


ASYMOE_EXPERTS_FUNCTIONS = AsyMoEExpertsInterface()


@use_experts_implementation(experts_interface=ASYMOE_EXPERTS_FUNCTIONS)
class AsyMoEExperts(AsyMoEExpertsMixin, nn.Module):
    """All experts of one MoE layer as fused 3-D SwiGLU weights, groups stored as vision, text, inter, evidence."""

    def __init__(self, config: AsyMoETextConfig, layout: ExpertLayout):
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.inter_start = layout.num_vision + layout.num_text
        self.evidence_start = self.inter_start + layout.num_inter
        self.is_hyperbolic = bool(config.hyperbolic_inter and layout.num_inter)
        if self.is_hyperbolic:
            self.mobius_bias_gate_up = nn.Parameter(torch.zeros(layout.num_inter, 2 * self.intermediate_dim))
            self.mobius_bias_down = nn.Parameter(torch.zeros(layout.num_inter, self.hidden_dim))
            # Shape [1], not 0-d: FSDP2's `fully_shard` rejects scalar parameters.
            self.log_scale_gate_up = nn.Parameter(torch.zeros(1))
            self.log_scale_down = nn.Parameter(torch.zeros(1))
            self.raw_curvature = nn.Parameter(torch.zeros(1), requires_grad=config.learn_curvature)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        evidence_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reference implementation: a loop over the experts that received tokens."""
        output = torch.zeros_like(hidden_states, dtype=torch.float32)
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            expert_ids = torch.full_like(token_idx, expert)
            rows = self.expert_inputs(hidden_states, evidence_states, token_idx, expert_ids)

            inter_rows = slice(0, len(rows) if self.inter_start <= expert < self.evidence_start else 0)

            def linear(x, name, expert=expert):
                return F.linear(x, getattr(self, name)[expert])

            def map_(out, which, expert_ids=expert_ids, inter_rows=inter_rows):
                self.hyperbolic_(out, expert_ids, which, inter_rows)

            out = self.expert_ffn(rows, linear, map_) * top_k_weights[token_idx, slot, None].to(rows.dtype)
            output.index_add_(0, token_idx, out.float())
        return output.to(hidden_states.dtype)


class AsyMoEEvidenceReadout(nn.Module):
    """r_t = attention of token t over the evidence positions (≤ t) of the layer's own keys/values, with a dedicated
    query projection; returns `h + g * W_o r` with the reliance gate g = σ(w_g·[h; r] + b_g). W_o starts at zero."""

    def __init__(self, config: AsyMoETextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.q_norm = AsyMoERMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.use_qk_norm else None
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.o_proj._asymoe_zero_init = True  # W_o = 0 at init (see `_init_weights`): the readout starts off
        self.gate = nn.Linear(config.hidden_size + width, 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value: tuple[torch.Tensor, torch.Tensor],
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        evidence_mask: torch.Tensor,
        past_length: int,
        first_query: int = 0,
    ) -> torch.Tensor:
        """`evidence_mask` [batch, past_length + seq] marks evidence among all positions seen so far. Queries before
        `first_query` (positions of this forward that read r = 0, see `_first_evidence_reader`) are not computed: they
        return h as they would anyway."""
        skipped, hidden_states = hidden_states[:, :first_query], hidden_states[:, first_query:]
        batch, seq, _ = hidden_states.shape
        key, value = key_value
        num_keys, total = key.shape[-2], evidence_mask.shape[-1]
        device = hidden_states.device
        if num_keys >= total:  # full or static cache: key j is position j
            evidence = evidence_mask if num_keys == total else F.pad(evidence_mask, (0, num_keys - total))
            first_key = 0
        else:  # sliding-window cache keeps the last `num_keys` positions
            evidence = evidence_mask[:, -num_keys:]
            first_key = total - num_keys
        allowed = evidence[:, None, None, :]
        if seq > 1:  # one query (a decoding step) is the last position: no evidence lies after it
            key_pos = torch.arange(first_key, first_key + num_keys, device=device)
            # past_length: a 0-d tensor in static caches
            query_pos = torch.arange(first_query, first_query + seq, device=device) + past_length
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])[None, None]

        query = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            query = self.q_norm(query)
        cos, sin = (embedding[:, first_query:] for embedding in position_embeddings)
        query = apply_rotary(query.transpose(1, 2), cos, sin)
        # A token with no evidence before it reads r = 0. Its mask row opens every key instead of none (a softmax over
        # no key is NaN on some attention backends, and NaN * 0 poisons the backward); the product then zeroes it.
        has_evidence = allowed.any(dim=-1, keepdim=True)
        readout = F.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=allowed | ~has_evidence,
            enable_gqa=self.num_key_value_groups > 1,
        )  # fp32 scores and weights for any model dtype (bf16 under autocast)
        readout = (readout * has_evidence).to(hidden_states.dtype).transpose(1, 2).reshape(batch, seq, -1)
        gate = torch.sigmoid(self.gate(torch.cat([hidden_states, readout], dim=-1)))
        output = hidden_states + gate * self.o_proj(readout)
        return torch.cat([skipped, output], dim=1) if first_query else output


class AsyMoESparseBlock(nn.Module):
    """Router + fused experts (+ evidence readout in evidence layers) with modality-masked routing."""

    def __init__(self, config: AsyMoETextConfig, layout: ExpertLayout):
        super().__init__()
        self.layout = layout
        self.router = AsyMoERouter(config, layout)
        self.experts = AsyMoEExperts(config, layout)
        self.evidence = AsyMoEEvidenceReadout(config) if layout.num_evidence else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_mask: torch.Tensor,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        evidence_mask: torch.Tensor | None = None,
        past_length: int = 0,
        token_mask: torch.Tensor | None = None,
        first_evidence_reader: int = 0,
    ) -> torch.Tensor:
        """`image_mask` and `token_mask` (non-padding, for the load balancing; `None`: all) are [batch, seq] bool;
        `first_evidence_reader`: see `_first_evidence_reader`."""
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        token_mask = None if token_mask is None else token_mask.reshape(-1)
        _, top_weights, top_index = self.router(flat, image_mask.reshape(-1), token_mask)
        evidence_states = None
        if self.evidence is not None:
            evidence_states = self.evidence(
                hidden_states, key_value, position_embeddings, evidence_mask, past_length, first_evidence_reader
            ).reshape(-1, hidden)
        return self.experts(flat, top_index, top_weights, evidence_states).view(batch, seq, hidden)


class AsyMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: AsyMoETextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = AsyMoEAttention(config, layer_idx)
        layout = config.expert_layout(layer_idx)
        self.mlp = AsyMoEMLP(config) if layout is None else AsyMoESparseBlock(config, layout)
        self.input_layernorm = AsyMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = AsyMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        evidence_mask: torch.Tensor | None = None,
        past_length: int = 0,
        first_evidence_reader: int = 0,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The cache comes under `CACHE_NAME`, the name `GradientCheckpointingLayer` drops while checkpointing."""
        residual = hidden_states
        attn_output, _, key_value = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=_one_cache(cache, past_key_values),
            **kwargs,
        )
        hidden_states = residual + attn_output
        normed = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, AsyMoESparseBlock):
            mlp_output = self.mlp(
                normed, image_mask, key_value, position_embeddings, evidence_mask, past_length, token_mask,
                first_evidence_reader,
            )
        else:
            mlp_output = self.mlp(normed)
        return hidden_states + mlp_output


class AsyMoEPreTrainedModel(PreTrainedModel):
    config: AsyMoEConfig
    config_class = AsyMoEConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["AsyMoEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _keep_in_fp32_modules_strict = ["router"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(AsyMoERouter, index=0),
        "hidden_states": AsyMoEDecoderLayer,
        "attentions": OutputRecorder(AsyMoEAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config.get_text_config()
        std = config.initializer_range
        if isinstance(module, AsyMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.is_hyperbolic:
                init.zeros_(module.mobius_bias_gate_up)
                init.zeros_(module.mobius_bias_down)
                scale = config.hyperbolic_scale
                init.constant_(module.log_scale_gate_up, math.log(scale or (2 * module.intermediate_dim) ** 0.5))
                init.constant_(module.log_scale_down, math.log(scale or module.hidden_dim**0.5))
                c = config.curvature  # softplus^-1(c) = c + log(1 - e^-c), exact for large c too
                init.constant_(module.raw_curvature, c + math.log(-math.expm1(-c)))
        elif isinstance(module, AsyMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, AsyMoEModel) and module.image_newline is not None:
            init.normal_(module.image_newline, mean=0.0, std=config.hidden_size**-0.5)
        elif isinstance(module, nn.Linear) and getattr(module, "_asymoe_zero_init", False):
            # The evidence readout's W_o starts at zero (function-preserving). Marked on the Linear itself: for
            # remote code, transformers skips `_init_weights` on modules without direct parameters (the readout).
            init.zeros_(module.weight)


class AsyMoETextModel(AsyMoEPreTrainedModel):
    """The AsyMoE decoder (no LM head)."""

    config: AsyMoETextConfig
    config_class = AsyMoETextConfig

    def __init__(self, config: AsyMoETextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([AsyMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = AsyMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = AsyMoERotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_mask: torch.BoolTensor | None = None,
        evidence_mask: torch.BoolTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the KV cache (`past_key_values` is accepted as its older name).
        image_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Image-token positions (routed to the vision/inter experts). Default: none.
        evidence_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions the evidence-priority experts read. Default: `image_mask`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.ndim == 2 and not torch.compiler.is_compiling():
            if tuple(attention_mask.shape) != (batch, int(past_length) + seq):
                raise ValueError(
                    f"attention_mask has shape {list(attention_mask.shape)}, but {batch} sequence(s) of "
                    f"{int(past_length)} cached + {seq} new positions need [{batch}, {int(past_length) + seq}]: "
                    "give one mask entry per position (cached ones included), as the processor and generate do."
                )
        if position_ids is None:
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_length).unsqueeze(0)
        if image_mask is None:
            image_mask = torch.zeros(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        token_mask = _current_token_mask(attention_mask, inputs_embeds)
        first_evidence_reader = 0
        if self.config.evidence_layers:
            evidence_mask = _evidence_history(
                cache, image_mask if evidence_mask is None else evidence_mask.bool(), past_length
            )
            first_evidence_reader = _first_evidence_reader(evidence_mask, image_mask, past_length)

        mask_fn = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        causal_mask = mask_fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                image_mask=image_mask,
                token_mask=token_mask,
                evidence_mask=evidence_mask,
                past_length=past_length,
                first_evidence_reader=first_evidence_reader,
                position_ids=position_ids,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        cache = cache if use_cache else None
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})


def _evidence_history(
    cache: Cache | None, evidence_now: torch.Tensor, past_length: int | torch.Tensor
) -> torch.Tensor:
    """Evidence mask over all positions seen so far. It is kept on the cache object, so that decoding steps (whose
    inputs hold only new tokens) still know where the prompt's evidence is; generated tokens are never evidence.

    A static cache (compileable, no sliding layer) gets a fixed [batch, max_length] mask updated in place at this
    forward's positions, like its keys: decoding steps then keep static shapes and read nothing on the host, so
    `generate(cache_implementation="static")` compiles to one graph. Other caches get a mask that grows.
    """
    if cache is None:
        return evidence_now
    previous = getattr(cache, "_asymoe_evidence", None)
    if cache.is_compileable and not any(cache.is_sliding):
        batch, seq = evidence_now.shape
        capacity = cache.get_max_length()
        if previous is None or previous.shape != (batch, capacity) or previous.device != evidence_now.device:
            previous = evidence_now.new_zeros(batch, capacity)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(previous)  # in-place updates keep CUDA graphs valid
            cache._asymoe_evidence = previous
        slots = torch.arange(capacity, device=previous.device)
        previous &= slots < past_length  # a reset cache restarts at 0: forget what it held beyond its length
        previous.index_copy_(1, torch.arange(seq, device=previous.device) + past_length, evidence_now)
        return previous
    if previous is None or previous.shape[0] != evidence_now.shape[0]:
        previous = evidence_now.new_zeros(evidence_now.shape[0], 0)
    previous = F.pad(previous[:, :past_length], (0, max(0, past_length - previous.shape[1])))
    history = torch.cat([previous, evidence_now], dim=1)
    cache._asymoe_evidence = history
    return history


def _first_evidence_reader(
    evidence_mask: torch.Tensor, image_mask: torch.Tensor, past_length: int | torch.Tensor
) -> int:
    """First position of this forward whose evidence readout is used: the earliest text token, over the batch, with
    evidence at or before it (image tokens never route to evidence experts; tokens before any evidence read r = 0),
    capped at the last position so that the readout always runs (its parameters stay in every backward, as DDP
    expects). The readout skips the positions before it, exactly: they return h. One host read, eager; one-token
    steps and compiled graphs start at 0."""
    seq = image_mask.shape[1]
    if seq == 1 or torch.compiler.is_compiling():
        return 0
    positions = torch.arange(seq, device=image_mask.device)
    seen = evidence_mask.cumsum(dim=1).index_select(1, positions + past_length) > 0
    readers = (seen & ~image_mask).any(dim=0)
    return int(torch.where(readers, positions, seq - 1).min())


class AsyMoEMultiModalProjector(nn.Module):
    """LLaVA's two-layer projector from (concatenated) vision features to the decoder width."""

    def __init__(self, config: AsyMoEConfig):
        super().__init__()
        num_layers = len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, list) else 1
        bias = config.multimodal_projector_bias
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_layers, text_width, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


@dataclass
class AsyMoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    image_hidden_states (`torch.FloatTensor` or list of them, *optional*): projected image features (anyres: one
        tensor per image).
    image_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): the positions of this forward that
        hold image features (routed to the vision/inter experts); generated tokens never do.
    """

    image_hidden_states: torch.FloatTensor | list[torch.FloatTensor] | None = None
    image_mask: torch.BoolTensor | None = None


@dataclass
class AsyMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    z_loss (`torch.FloatTensor`, *optional*): router z-loss (unweighted), when `output_router_logits`.
    image_hidden_states (`torch.FloatTensor` or list of them, *optional*): projected image features (anyres: one
        tensor per image).
    """

    z_loss: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | list[torch.FloatTensor] | None = None


class AsyMoEModel(AsyMoEPreTrainedModel):
    """Vision tower + projector + AsyMoE decoder, without the LM head.

    With `config.image_grid_pinpoints` (LLaVA-NeXT / OneVision "anyres"), an image is a base tile plus a grid of
    tiles; the grid's features are unpadded to the image's aspect ratio, pooled (OneVision `vision_aspect_ratio`)
    and end every row with the learned `image_newline`. Videos are not supported.
    """

    def __init__(self, config: AsyMoEConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = AsyMoEMultiModalProjector(config)
        self.image_newline = None
        if config.image_grid_pinpoints is not None:
            self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = AsyMoETextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Projected image features.

        Plain LLaVA: `pixel_values [num_images, C, H, W]` -> `[num_images, num_image_tokens, hidden]`.
        Anyres: `pixel_values [num_images, max_tiles, C, H, W]` (zero-padded tiles) or all tiles concatenated
        `[total_tiles, C, H, W]`, `image_sizes [num_images, 2]` (height, width before preprocessing) and, for
        OneVision, `batch_num_images` (images per sample: samples with several images are not tiled) -> one
        `[num_features_i, hidden]` tensor per image.
        """
        if self.config.image_grid_pinpoints is None:
            return self.multi_modal_projector(self._select_vision_features(pixel_values))
        return self._anyres_image_features(pixel_values, image_sizes, batch_num_images)

    def _select_vision_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """[tiles, C, H, W] -> the configured vision-tower layer(s) [tiles, patches, vision_hidden]."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [num_images, {expected[0]}, {expected[1]}, {expected[2]}] for this "
                f"vision tower, got {list(pixel_values.shape)}; preprocess images with the checkpoint's processor "
                "(AutoProcessor.from_pretrained(..., trust_remote_code=True))."
            )
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        layer = self.config.vision_feature_layer
        if isinstance(layer, list):
            features = torch.cat([outputs.hidden_states[i] for i in layer], dim=-1)
        else:
            features = outputs.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    def anyres_layouts(
        self, image_sizes: torch.LongTensor | None, batch_num_images: torch.LongTensor | None = None
    ) -> list[AnyresLayout | None]:
        """Per image, its anyres tile geometry, or `None` for an image that is not tiled (OneVision multi-image)."""
        if image_sizes is None:
            raise ValueError(
                "This anyres (LLaVA-NeXT / OneVision) model needs `image_sizes` with `pixel_values`: pass the "
                "processor's output unchanged (AutoProcessor.from_pretrained(..., trust_remote_code=True))."
            )
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
        tiled = [True] * len(sizes)
        if batch_num_images is not None:
            counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else batch_num_images
            tiled = [count == 1 for count in counts for _ in range(count)]
            if len(tiled) != len(sizes):
                raise ValueError(
                    f"batch_num_images {counts} sums to {len(tiled)} images but image_sizes holds {len(sizes)}."
                )
        vision = self.config.vision_config
        return [
            anyres_layout(size, self.config.image_grid_pinpoints, vision.image_size,
                          vision.image_size // vision.patch_size, self.config.max_anyres_tiles) if tile else None
            for size, tile in zip(sizes, tiled)
        ]

    def _anyres_image_features(
        self, pixel_values: torch.FloatTensor, image_sizes, batch_num_images
    ) -> list[torch.Tensor]:
        layouts = self.anyres_layouts(image_sizes, batch_num_images)
        num_tiles = [layout.num_tiles if layout else 1 for layout in layouts]
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(layouts):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(layouts)}."
                )
            pixel_values = torch.cat([tiles[:count] for tiles, count in zip(pixel_values, num_tiles)])
        if pixel_values.shape[0] != sum(num_tiles):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} tiles, but the image sizes call for {sum(num_tiles)} "
                f"({num_tiles} per image): preprocess the images with this model's processor."
            )
        features = self.multi_modal_projector(self._select_vision_features(pixel_values))
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if features.shape[1] != side * side:
            raise ValueError(
                f"anyres tiles need {side}x{side} = {side * side} features per tile, the vision tower gives "
                f"{features.shape[1]} with vision_feature_select_strategy="
                f"{self.config.vision_feature_select_strategy!r} ('default' drops the first token: use it for towers "
                "with a CLS token, 'full' for the others)."
            )
        newline = self.image_newline
        per_image = []
        for tiles, layout in zip(features.split(num_tiles), layouts):
            base = tiles[0]
            if layout is None:  # OneVision, several images in one sample: base tile + one newline
                per_image.append(torch.cat([base, newline[None].to(base.dtype)]))
                continue
            rows, cols = layout.tiles
            grid = tiles[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
            grid = grid.reshape(-1, rows * side, cols * side)  # [hidden, feature rows, feature columns]
            height, width = layout.unpadded
            top, left = (rows * side - height) // 2, (cols * side - width) // 2
            grid = grid[:, top : top + height, left : left + width]
            if layout.pooled is not None:
                grid = F.interpolate(grid[None], size=list(layout.pooled), mode="bilinear")[0]
            row_ends = newline[:, None, None].to(grid.dtype).expand(grid.shape[0], grid.shape[1], 1)
            grid = torch.cat([grid, row_ends], dim=-1)
            per_image.append(torch.cat([base, grid.flatten(1).transpose(0, 1)]))
        return per_image

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        evidence_mask: torch.BoolTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> AsyMoEModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = _one_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = self.image_positions(input_ids, inputs_embeds, mm_token_type_ids, pixel_values, cache)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_sizes, batch_num_images)
            if isinstance(image_features, list):  # anyres: one tensor per image, of its own length
                per_image = [features.shape[0] for features in image_features]
                image_features = torch.cat(image_features)
            else:
                per_image = [image_features.shape[1]] * image_features.shape[0]
            flat_features = image_features.reshape(-1, image_features.shape[-1])
            if not torch.compiler.is_compiling():  # counting reads a tensor on the host: eager forwards only
                num_placeholders = int(image_mask.sum())
                if num_placeholders != flat_features.shape[0]:
                    raise ValueError(
                        f"Image features and image tokens do not match: the text holds {num_placeholders} image "
                        f"tokens (id {self.config.image_token_id}) but {len(per_image)} image(s) give "
                        f"{flat_features.shape[0]} features ({per_image} per image). Put one '<image>' per image in "
                        "the text and let AsyMoEProcessor expand it."
                    )
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1).to(inputs_embeds.device), flat_features.to(inputs_embeds.dtype)
            )
        elif not torch.compiler.is_compiling() and not _continues_cache(cache) and image_mask.any():
            raise ValueError(
                f"The text holds {int(image_mask.sum())} image tokens but no `pixel_values` were given: pass the "
                "images, or remove the '<image>' placeholders."
            )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            image_mask=image_mask,
            evidence_mask=evidence_mask,
            **kwargs,
        )
        return AsyMoEModelOutputWithPast(**outputs, image_hidden_states=image_features, image_mask=image_mask)

    def image_positions(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        mm_token_type_ids: torch.LongTensor | None,
        pixel_values: torch.FloatTensor | None,
        cache: Cache | None,
    ) -> torch.BoolTensor:
        """[batch, seq] bool: which positions of this forward are image tokens (the one place this is decided).

        `mm_token_type_ids` (1 = image) when given: cut to this forward's positions (transformers < 5.2x passes the
        whole sequence's to decoding steps). Otherwise the `<image>` ids, except in a forward that continues a
        cache without images (a decoding step): generated tokens are text, even `<image>` ids.
        """
        batch, seq = inputs_embeds.shape[:2]
        if mm_token_type_ids is not None:
            if mm_token_type_ids.shape[0] != batch or mm_token_type_ids.shape[-1] < seq:
                raise ValueError(
                    f"mm_token_type_ids has shape {list(mm_token_type_ids.shape)} but the inputs are [{batch}, {seq}]: "
                    "give one type per input position (1 = image token), as the processor returns them "
                    "(return_mm_token_type_ids=True)."
                )
            return mm_token_type_ids[..., -seq:] == 1
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("With `inputs_embeds` and `pixel_values`, pass `mm_token_type_ids` (1 = image token).")
            return torch.zeros(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        if pixel_values is None and _continues_cache(cache):
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.config.image_token_id


class AsyMoEForConditionalGeneration(AsyMoEPreTrainedModel, GenerationMixin):
    """AsyMoE with a language-modeling head: `generate()`, training loss (image positions never count), router aux
    losses added when `output_router_logits`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: AsyMoEConfig):
        super().__init__(config)
        self.model = AsyMoEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor | list[torch.Tensor]:
        return self.model.get_image_features(pixel_values, image_sizes, batch_num_images)

    def _prepare_model_inputs(self, inputs=None, bos_token_id=None, model_kwargs=None):
        """`generate()`: record the prompt's image positions as `mm_token_type_ids`; generate extends them with zeros,
        so generated tokens are text even when they are `<image>` ids, with or without the cache."""
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        if input_name == "input_ids" and model_kwargs.get("mm_token_type_ids") is None:
            model_kwargs["mm_token_type_ids"] = (inputs == self.config.image_token_id).long()
        return inputs, input_name, model_kwargs

    @classmethod
    def from_dense(cls, source, **overrides) -> AsyMoEForConditionalGeneration:
        """Upcycle a dense LLaVA / LLaVA-NeXT / OneVision model (directory, Hub id or model) into AsyMoE, in memory.

        `overrides`: `moe_variant`, `mode` ("copy": same logits as the source; "partition"), `experts`, `seed`,
        `noise_std`, MoE fields of the text config; see `asymoe.upcycling.upcycle` (needs the asymoe toolkit).
        """
        try:
            from asymoe.upcycling import upcycle
        except ImportError as err:
            raise ImportError(
                "AsyMoEForConditionalGeneration.from_dense needs the asymoe toolkit: pip install asymoe"
            ) from err
        return upcycle(source, None, **overrides)

    def moe_blocks(self) -> list[AsyMoESparseBlock]:
        """The MoE blocks in layer order (the order of `router_logits`)."""
        return [m for m in self.model.language_model.modules() if isinstance(m, AsyMoESparseBlock)]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        evidence_mask: torch.BoolTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> AsyMoECausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the KV cache; transformers < 5.24 pass it as `past_key_values`, also accepted.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (-100 = ignored). Image-token positions are always ignored.
        output_router_logits (`bool`, *optional*):
            Return the router logits of every MoE layer and add `router_aux_loss_coef * aux_loss +
            router_z_loss_coef * z_loss` to the loss. Default: `config.text_config.output_router_logits`.
        mm_token_type_ids (`torch.LongTensor`, *optional*): 1 at image positions (default: from `input_ids`).
        evidence_mask (`torch.BoolTensor`, *optional*): positions evidence experts read (default: image positions).
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): anyres models: each image's
            (height, width) before preprocessing, as the processor returns it; not needed on decoding steps.
        batch_num_images (`torch.LongTensor` of shape `(batch_size,)`, *optional*): OneVision: images per sample
            (images of multi-image samples are not tiled), as the processor returns it.
        """
        text_config = self.config.text_config
        cache = _one_cache(cache, past_key_values)
        if output_router_logits is None:
            output_router_logits = text_config.output_router_logits
        output_router_logits = bool(output_router_logits and text_config.moe_layers)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_token_type_ids=mm_token_type_ids,
            evidence_mask=evidence_mask,
            image_sizes=image_sizes,
            batch_num_images=batch_num_images,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        image_mask = outputs.image_mask
        loss = None
        if labels is not None:
            labels = labels.masked_fill(image_mask.to(labels.device), -100)
            loss = self.loss_function(logits, labels, vocab_size=text_config.vocab_size, **kwargs)

        aux_loss = z_loss = None
        if output_router_logits:
            valid = _current_token_mask(attention_mask, hidden_states)
            aux_loss, z_loss = router_losses(outputs.router_logits, self.moe_blocks(), image_mask, valid)
            if loss is not None:
                loss = loss + text_config.router_aux_loss_coef * aux_loss.to(loss.device)
                if text_config.router_z_loss_coef:
                    loss = loss + text_config.router_z_loss_coef * z_loss.to(loss.device)

        return AsyMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            image_hidden_states=outputs.image_hidden_states,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config, plus the flat remote-code files that `trust_remote_code=True` loads."""
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_remote_code(save_directory, __file__)


def _continues_cache(cache: Cache | None) -> bool:
    """Whether a forward continues a filled cache (a decoding step). A compiled forward counts as one (`generate`
    compiles decoding steps only): reading the cache's length, a tensor in static caches, would sync with the host."""
    return cache is not None and (torch.compiler.is_compiling() or cache.get_seq_length() > 0)


def _current_token_mask(attention_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool mask of the non-padding tokens of this forward (the 2-D mask may also cover the cache)."""
    batch, seq = hidden_states.shape[:2]
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device)
    return attention_mask[:, -seq:].bool().to(hidden_states.device)


def router_losses(
    router_logits: tuple[torch.Tensor, ...],
    blocks: list[AsyMoESparseBlock],
    image_mask: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch load-balancing loss per modality over its reachable experts, and the router z-loss.

    Per layer and modality m with reachable experts R_m and (non-padding) tokens T_m:
    `|R_m| * sum_e f_e * P_e`, f_e the fraction of T_m's top-k slots sent to e (chosen as the router chooses,
    `select_experts`), P_e the mean routing probability. Both losses are averaged over the (layer, modality) pairs
    that have tokens; 1.0 is perfect balance.
    """
    image_mask, valid = image_mask.reshape(-1), valid.reshape(-1)
    modality = (~image_mask).long()
    balance_terms, z_terms = [], []
    for logits, block in zip(router_logits, blocks):
        logits, router = logits.float(), block.router
        reach = reach_masks(block.layout, logits.device)
        masked, _, chosen = select_experts(
            logits, reach[modality], router.e_score_correction_bias.to(logits.device)[modality], router.top_k
        )
        probs = F.softmax(masked, dim=-1)
        slots = F.one_hot(chosen, logits.shape[-1]).float().sum(dim=1) / router.top_k  # [N, E], rows sum to 1
        for row in range(2):
            tokens = valid & (modality == row)
            if not bool(tokens.any()):
                continue
            experts = reach[row]
            fraction = slots[tokens][:, experts].mean(dim=0)
            balance_terms.append(int(experts.sum()) * (fraction * probs[tokens][:, experts].mean(dim=0)).sum())
            z_terms.append(torch.logsumexp(logits[tokens][:, experts], dim=-1).pow(2).mean())
    if not balance_terms:
        zero = router_logits[0].new_zeros(())
        return zero, zero
    return torch.stack(balance_terms).mean(), torch.stack(z_terms).mean()


__all__ = [
    "AsyMoEForConditionalGeneration",
    "AsyMoEModel",
    "AsyMoEPreTrainedModel",
    "AsyMoETextModel",
    "reach_masks",
    "router_losses",
    "select_experts",
]
