"""One MoE layer, side by side in one process: AsyMoE block vs a dense SwiGLU of equal activated FLOPs vs
transformers' `MixtralSparseMoeBlock` and `Qwen3MoeSparseMoeBlock` at matched experts; plus the hyperbolic vs
Euclidean expert.

Each case runs forward and forward+backward on the same tokens (a share of them image tokens, as in LLaVA), with
balanced routing (random routers) and skewed routing (one reachable expert per modality favoured by ~6 logits).
Time is the median of `--repeat` rounds after `--warmup`, each round running every case of a routing once in turn, so
that load drifting during the run hits all cases alike (CUDA: synchronised; CPU: wall clock); peak memory is the most
allocated above what was allocated before one more run (CUDA: the allocator's peak; CPU: the torch profiler's
allocation events), i.e. activations and transients. `--compile` runs every module through `torch.compile`
(inductor, fullgraph); `--compile-maps` compiles only AsyMoE's Möbius maps and leaves everything else eager (what
fusing the maps' passes into generated kernels would buy the eager layer). Prints ratios to the dense FFN and to
transformers' Mixtral block (the peer at the same expert count), and writes JSON.

    .venv/bin/python bench/moe_layer.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --intermediate 1408
    .venv/bin/python bench/moe_layer.py --device cpu --dtype fp32 --tokens 1024 --hidden 256 --intermediate 128
"""

from __future__ import annotations

import argparse
import contextlib
import math
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from asymoe.benchmarking import interleaved_median_seconds, peak_memory_mib, write_bench_record
from asymoe.cli import DTYPES
from asymoe.configuration import AsyMoETextConfig
from asymoe.modeling import modeling_asymoe
from asymoe.modeling.modeling_asymoe import AsyMoEMLP, AsyMoESparseBlock


def text_config(args, **overrides) -> AsyMoETextConfig:
    vision, text, inter = args.layout
    fields = dict(
        hidden_size=args.hidden, intermediate_size=args.intermediate * args.top_k,
        moe_intermediate_size=args.intermediate, num_hidden_layers=2, num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128), vocab_size=32, moe_layers=[1], evidence_layers=[],
        moe_variant="asymoe", num_vision_experts=vision, num_text_experts=text, num_inter_experts=inter,
        num_evidence_experts=0, num_experts_per_tok=args.top_k,
    )
    if args.compile:  # the balancing's load count runs outside compiled graphs (a graph break fullgraph refuses)
        fields["router_bias_update_rate"] = 0.0
    fields.update(overrides)
    config = AsyMoETextConfig(**fields)
    config._experts_implementation = args.experts_implementation
    return config


def skew(router_weight: torch.Tensor, direction: torch.Tensor, experts: list[int]) -> None:
    """Favour `experts` for every token: their router rows gain ~6 logits along the tokens' shared direction."""
    with torch.no_grad():
        for expert in experts:
            router_weight[expert] += 3.0 * direction.to(router_weight.dtype)


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(args.hidden, device=device), dim=0)
    tokens = torch.randn(1, args.tokens, args.hidden, device=device) + 2.0 * direction
    tokens = tokens.to(dtype)
    image_mask = torch.zeros(1, args.tokens, dtype=torch.bool, device=device)
    image_mask[:, : int(args.tokens * args.image_share)] = True

    config = text_config(args)
    asymoe = AsyMoESparseBlock(config, config.expert_layout(1)).to(device)
    euclidean_config = text_config(args, hyperbolic_inter=False)
    asymoe_euclidean = AsyMoESparseBlock(euclidean_config, euclidean_config.expert_layout(1)).to(device)
    dense = AsyMoEMLP(config).to(device)
    num_experts = sum(args.layout)
    mixtral_config = MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=num_experts,
        num_experts_per_tok=args.top_k, router_jitter_noise=0.0,
    )
    mixtral_config._experts_implementation = args.experts_implementation
    mixtral = MixtralSparseMoeBlock(mixtral_config).to(device)
    qwen3_config = Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.intermediate, num_experts=num_experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True,
    )
    qwen3_config._experts_implementation = args.experts_implementation
    qwen3 = Qwen3MoeSparseMoeBlock(qwen3_config).to(device)
    for module in (asymoe, asymoe_euclidean, dense, mixtral, qwen3):
        for name, param in module.named_parameters():
            with torch.no_grad():
                if name.endswith("log_scale_gate_up"):  # the model's own init: s = sqrt(width)
                    param.fill_(0.5 * math.log(2 * args.intermediate))
                elif name.endswith("log_scale_down"):
                    param.fill_(0.5 * math.log(args.hidden))
                elif "mobius_bias" in name or "raw_curvature" in name:
                    param.normal_(0.0, 0.05)
                else:
                    param.normal_(0.0, args.hidden**-0.5)
        module.to(dtype)
    for block in (asymoe, asymoe_euclidean):
        block.router.float()  # routers stay fp32, as in the model

    # --compile: inductor, one graph per module (fullgraph: a graph break or host sync fails the run).
    compiled = (lambda module: torch.compile(module, fullgraph=True)) if args.compile else (lambda module: module)
    dense_run, mixtral_run, qwen3_run = compiled(dense), compiled(mixtral), compiled(qwen3)
    asymoe_run, asymoe_euclidean_run = compiled(asymoe), compiled(asymoe_euclidean)
    cases = {
        "dense_ffn": lambda x: dense_run(x),
        "mixtral_block": lambda x: mixtral_run(x),
        "qwen3_moe_block": lambda x: qwen3_run(x),
        "asymoe_block": lambda x: asymoe_run(x, image_mask),
        "asymoe_block_euclidean": lambda x: asymoe_euclidean_run(x, image_mask),
    }

    def fwd(forward):
        def run():
            with torch.no_grad():
                forward(tokens)
        return run

    def fwd_bwd(forward):
        def run():
            x = tokens.detach().requires_grad_(True)
            forward(x).float().square().mean().backward()
        return run

    # The inter experts alone, every token routed to them: hyperbolic vs Euclidean Möbius-free expert.
    inter = config.expert_layout(1).group_slices()["inter"]
    flat = tokens.reshape(-1, args.hidden)
    top_index = torch.stack([torch.full((args.tokens,), inter.start + i % (inter.stop - inter.start), device=device)
                             for i in range(args.top_k)], dim=-1)
    top_weights = torch.full(top_index.shape, 1.0 / args.top_k, device=device)

    def expert_fwd_bwd(experts):
        def run():
            x = flat.detach().requires_grad_(True)
            experts(x, top_index, top_weights).float().square().mean().backward()
        return run

    # Every case of a routing is timed in turn, round after round (`interleaved_median_seconds`), so that the ratios
    # between cases survive load that drifts during the run; peak memory does not move between runs.
    results = {}
    for routing in ("balanced", "skewed"):
        if routing == "skewed":
            groups = config.expert_layout(1).group_slices()
            favoured = [groups[g].start for g in ("vision", "text") if g in groups]
            skew(asymoe.router.weight, direction, favoured)
            skew(asymoe_euclidean.router.weight, direction, favoured)
            skew(mixtral.gate.weight, direction, [0])
            skew(qwen3.gate.weight, direction, [0])
        timed = {}
        for name, forward in cases.items():
            if not (routing == "skewed" and name == "dense_ffn"):
                timed[(f"{routing}/{name}", "fwd")] = fwd(forward)
                timed[(f"{routing}/{name}", "fwd_bwd")] = fwd_bwd(forward)
        if routing == "balanced":
            for name, block in (("hyperbolic_expert", asymoe), ("euclidean_expert", asymoe_euclidean)):
                timed[(name, "fwd_bwd")] = expert_fwd_bwd(compiled(block.experts))
        for (name, kind), seconds in interleaved_median_seconds(timed, device, args.warmup, args.repeat).items():
            results.setdefault(name, {})[kind] = {"ms": seconds * 1e3, "peak_mib": peak_memory_mib(timed[name, kind],
                                                                                                  device)}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--image-share", type=float, default=576 / 2048, help="share of image tokens")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408, help="expert FFN width")
    parser.add_argument("--layout", default="2,2,4", help="vision,text,inter experts (evidence off: layer bench)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    compile_choice = parser.add_mutually_exclusive_group()
    compile_choice.add_argument("--compile", action="store_true", help="torch.compile every module (inductor, fullgraph)")
    compile_choice.add_argument("--compile-maps", action="store_true",
                                help="torch.compile only the Möbius maps (inductor), the rest eager")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--output", default="bench/results/moe_layer.json")
    args = parser.parse_args(argv)
    args.layout = tuple(int(n) for n in args.layout.split(","))
    # --compile-maps: the experts call the maps through this module attribute, swapped for the run only.
    maps = (mock.patch.object(modeling_asymoe, "mobius_bias_", torch.compile(modeling_asymoe.mobius_bias_, dynamic=True))
            if args.compile_maps else contextlib.nullcontext())
    with maps:
        results = run(args)
    dense = results["balanced/dense_ffn"]
    print(f"{'case':40s} {'fwd ms':>9s} {'×dense':>7s} {'fwd+bwd ms':>11s} {'×dense':>7s} {'×Mixtral':>9s} "
          f"{'peak MiB':>9s} {'×dense':>7s}")
    blocks = sorted(results, key=lambda name: name.endswith("_expert"))  # the experts alone last
    for name in blocks:
        entry, block = results[name], not name.endswith("_expert")
        row = f"{name:40s} " + (f"{entry['fwd']['ms']:9.3f} {entry['fwd']['ms'] / dense['fwd']['ms']:7.2f} "
                                if block else f"{'':17s} ")
        ms, peak = entry["fwd_bwd"]["ms"], entry["fwd_bwd"]["peak_mib"]
        if block:
            mixtral = results[f"{name.split('/')[0]}/mixtral_block"]["fwd_bwd"]["ms"]
            row += f"{ms:11.3f} {ms / dense['fwd_bwd']['ms']:7.2f} {ms / mixtral:9.2f} "
            row += f"{peak:9.1f} {peak / dense['fwd_bwd']['peak_mib']:7.2f}"
        else:
            row += f"{ms:11.3f} {'':7s} {'':9s} {peak:9.1f}"
        print(row)
    # The comparison to the peer in one number per run: transformers' Mixtral block at the same expert count.
    for routing in ("balanced", "skewed"):
        mixtral = results[f"{routing}/mixtral_block"]["fwd_bwd"]["ms"]
        print(f"AsyMoE / transformers Mixtral block ({sum(args.layout)} experts, top-{args.top_k}, {routing}, fwd+bwd): "
              f"hyperbolic inter {results[f'{routing}/asymoe_block']['fwd_bwd']['ms'] / mixtral:.2f}×, Euclidean inter "
              f"{results[f'{routing}/asymoe_block_euclidean']['fwd_bwd']['ms'] / mixtral:.2f}×")
    ratio = results["hyperbolic_expert"]["fwd_bwd"]["ms"] / results["euclidean_expert"]["fwd_bwd"]["ms"]
    print(f"hyperbolic / Euclidean expert (fwd+bwd): {ratio:.2f}×")
    print(f"wrote {write_bench_record(args.output, args, args.device, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
