"""Routing statistics of AsyMoE models: which expert groups image and text tokens use, per MoE layer.

`RoutingStatistics` accumulates over forwards (a training run, an evaluation set) and is the one place the
fine-tuning callback and the analysis command get their routing numbers from; `plot_routing` draws them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import atomic_save_figure
from .modeling.modeling_asymoe import reach_masks, select_experts

MODALITIES = ("image", "text")


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (where gradient checkpointing re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


class RoutingStatistics:
    """Per MoE layer and modality: tokens seen, top-k slots per expert, mean normalised router entropy.

    `track(model)` hooks the routers, so the counts are the routers' own choices (`select_experts`, load-balancing
    bias included), padding excluded, whatever calls the model (a TRL training step through its fused LM head, an
    evaluation loop). Entropy of the softmax over the experts a token may reach, divided by log(#reachable):
    1 = uniform, 0 = one expert.
    """

    def __init__(self, config):
        text_config = config.get_text_config()
        self.layers = list(text_config.moe_layers)
        self.layouts = [text_config.expert_layout(layer) for layer in self.layers]
        self.reset()

    def reset(self) -> None:
        self.tokens = torch.zeros(len(self.layers), 2, dtype=torch.long)
        self.slots = [torch.zeros(2, layout.num_experts, dtype=torch.long) for layout in self.layouts]
        self.entropy = torch.zeros(len(self.layers), 2, dtype=torch.float64)

    @torch.no_grad()
    def record(self, index: int, logits: torch.Tensor, top_index: torch.Tensor, image_mask: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> None:
        """Add one router call of MoE layer number `index`: logits [N, E], chosen experts [N, k], image_mask and
        token_mask (non-padding; `None`: all) [N]."""
        logits, top_index = logits.detach().float().cpu(), top_index.cpu()
        image_mask = image_mask.reshape(-1).cpu()
        valid = torch.ones_like(image_mask) if token_mask is None else token_mask.reshape(-1).bool().cpu()
        for modality, reach in enumerate(reach_masks(self.layouts[index], "cpu")):
            rows = valid & (image_mask == (modality == 0))
            count = int(rows.sum())
            if count == 0:
                continue
            self.slots[index][modality] += torch.bincount(top_index[rows].reshape(-1), minlength=reach.numel())
            masked, _, _ = select_experts(logits[rows], reach.expand(count, -1), torch.zeros(()), 1)
            probs = F.softmax(masked, dim=-1)  # the routing probabilities, as in the router's losses
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            reachable = int(reach.sum())
            self.entropy[index, modality] += float(entropy.sum()) / (math.log(reachable) if reachable > 1 else 1.0)
            self.tokens[index, modality] += count

    def track(self, model) -> list[torch.utils.hooks.RemovableHandle]:
        """Record every router call of `model`'s MoE blocks (in layer order) from now on; returns the hook handles
        (`.remove()` each to stop). Recomputations inside a backward pass (gradient checkpointing) are not counted
        twice."""
        blocks = model.moe_blocks()
        if len(blocks) != len(self.layers):
            raise ValueError(f"the model has {len(blocks)} MoE blocks, these statistics are for {len(self.layers)} "
                             "MoE layers: build RoutingStatistics from the model's own config.")

        def hook_for(index):
            def hook(router, args, output):
                if _in_backward():
                    return
                hidden_states, image_mask, *rest = args
                logits, _, top_index = output
                self.record(index, logits, top_index, image_mask, rest[0] if rest else None)
            return hook

        return [block.router.register_forward_hook(hook_for(index)) for index, block in enumerate(blocks)]

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the counts over the processes of `torch.distributed`'s default group (nothing without one), so that
        every rank holds the routing of all ranks' forwards. A collective: every rank must call it; `device` is
        where the backend reduces (cuda for NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts = [self.tokens, self.entropy, *self.slots]
        flat = torch.cat([part.reshape(-1).double() for part in parts]).to(device)
        dist.all_reduce(flat)
        for part, values in zip(parts, flat.cpu().split([part.numel() for part in parts])):
            part.copy_(values.view_as(part))  # counts are exact in float64

    def summary(self) -> list[dict]:
        """One dict per MoE layer: for each modality, tokens, the share of top-k slots per group and per expert,
        the imbalance (the most loaded reachable expert's share over the mean share of the reachable experts:
        1 = balanced) and the mean normalised router entropy (None where the modality sent no tokens)."""
        layers = []
        for index, (layer, layout) in enumerate(zip(self.layers, self.layouts)):
            entry = {"layer": layer}
            for modality, name in enumerate(MODALITIES):
                tokens = int(self.tokens[index, modality])
                slots = self.slots[index][modality].double()
                total = float(slots.sum())
                load = (slots / total).tolist() if total else [0.0] * layout.num_experts
                reachable = [load[expert] for expert in layout.reachable(name)]
                entry[name] = {
                    "tokens": tokens,
                    "group_load": {
                        group: sum(load[span]) for group, span in layout.group_slices().items()
                    },
                    "expert_load": load,
                    "imbalance": max(reachable) * len(reachable) if tokens else None,
                    "entropy": float(self.entropy[index, modality]) / tokens if tokens else None,
                }
            layers.append(entry)
        return layers

    def log_scalars(self, prefix: str = "routing") -> dict[str, float]:
        """Flat `{name: value}` of the summary, for trainer logs (`routing/L3/text/inter`, `.../entropy`)."""
        scalars = {}
        for entry in self.summary():
            for modality in MODALITIES:
                stats = entry[modality]
                if not stats["tokens"]:
                    continue
                base = f"{prefix}/L{entry['layer']}/{modality}"
                scalars.update({f"{base}/{group}": load for group, load in stats["group_load"].items()})
                scalars[f"{base}/imbalance"] = stats["imbalance"]
                scalars[f"{base}/entropy"] = stats["entropy"]
        return scalars


GROUP_COLOURS = {"vision": "#4C72B0", "text": "#DD8452", "inter": "#55A868", "evidence": "#C44E52"}


def plot_routing(summary: list[dict], path: str | Path, title: str = "Routing by modality") -> Path:
    """Stacked bars of the share of top-k slots each expert group gets, per MoE layer, image and text tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary:
        raise ValueError("no MoE layers to plot: the model is dense (moe_variant='dense' or moe_layers=[]).")
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    labels = [f"L{entry['layer']}" for entry in summary]
    for axis, modality in zip(axes, MODALITIES):
        bottom = [0.0] * len(summary)
        for group, colour in GROUP_COLOURS.items():
            heights = [entry[modality]["group_load"].get(group, 0.0) for entry in summary]
            if any(heights):
                axis.bar(labels, heights, bottom=bottom, color=colour, label=group)
                bottom = [b + h for b, h in zip(bottom, heights)]
        axis.set_title(f"{modality} tokens")
        axis.set_xlabel("MoE layer")
    axes[0].set_ylabel("share of top-k slots")
    axes[1].legend(loc="upper right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return atomic_save_figure(figure, path)
