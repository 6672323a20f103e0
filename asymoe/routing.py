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

MODALITIES = ("image", "text")


class RoutingStatistics:
    """Per MoE layer and modality: tokens seen, top-k slots per expert, mean normalised router entropy.

    Routing is recomputed from the router logits exactly as the model routes: softmax over the experts the
    modality may reach, then top-k. Entropy is divided by log(#reachable experts): 1 = uniform, 0 = one expert.
    """

    def __init__(self, config):
        text_config = config.get_text_config()
        self.top_k = text_config.num_experts_per_tok
        self.layers = list(text_config.moe_layers)
        self.layouts = [text_config.expert_layout(layer) for layer in self.layers]
        self.reset()

    def reset(self) -> None:
        self.tokens = torch.zeros(len(self.layers), 2, dtype=torch.long)
        self.slots = [torch.zeros(2, layout.num_experts, dtype=torch.long) for layout in self.layouts]
        self.entropy = torch.zeros(len(self.layers), 2, dtype=torch.float64)

    def _reach(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layouts[index]
        groups = layout.group_slices()
        masks = []
        for names in (("vision", "inter"), ("text", "inter", "evidence")):
            mask = torch.zeros(layout.num_experts, dtype=torch.bool)
            for name in names:
                if name in groups:
                    mask[groups[name]] = True
            masks.append(mask)
        return masks[0], masks[1]

    @torch.no_grad()
    def update(
        self, router_logits: tuple[torch.Tensor, ...], image_mask: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Add one forward: router logits [N, E] per MoE layer, image_mask and valid (non-padding) [batch, seq]."""
        if len(router_logits) != len(self.layers):
            raise ValueError(f"got router logits of {len(router_logits)} layers, the model has {len(self.layers)} "
                             "MoE layers: pass the `router_logits` of a forward with output_router_logits=True.")
        image_mask = image_mask.reshape(-1).cpu()
        valid = torch.ones_like(image_mask) if valid is None else valid.reshape(-1).bool().cpu()
        for index, logits in enumerate(router_logits):
            logits = logits.detach().float().cpu()
            for modality, reach in enumerate(self._reach(index)):
                rows = valid & (image_mask == (modality == 0))
                count = int(rows.sum())
                if count == 0 or not bool(reach.any()):
                    continue
                masked = logits[rows].masked_fill(~reach, float("-inf"))
                probs = F.softmax(masked, dim=-1)
                chosen = torch.topk(masked, min(self.top_k, int(reach.sum())), dim=-1).indices
                self.slots[index][modality] += torch.bincount(chosen.reshape(-1), minlength=reach.numel())
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
                norm = math.log(int(reach.sum())) if int(reach.sum()) > 1 else 1.0
                self.entropy[index, modality] += float(entropy.sum()) / norm
                self.tokens[index, modality] += count

    def track(self, model) -> torch.utils.hooks.RemovableHandle:
        """Update from every forward of `model` that returns router logits (e.g. TRL training steps).

        Returns the hook handle: call `.remove()` to stop.
        """
        image_token_id = model.config.image_token_id

        def hook(module, args, kwargs, output):
            logits = getattr(output, "router_logits", None)
            if not logits:
                return
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            types = kwargs.get("mm_token_type_ids")
            if types is not None:
                image_mask = types == 1
            elif input_ids is not None:
                image_mask = input_ids == image_token_id
            else:
                return
            mask = kwargs.get("attention_mask")
            valid = mask[:, -image_mask.shape[1]:] if mask is not None and mask.ndim == 2 else None
            self.update(logits, image_mask, valid)

        return model.register_forward_hook(hook, with_kwargs=True)

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
        and the mean normalised router entropy (None where the modality sent no tokens)."""
        layers = []
        for index, (layer, layout) in enumerate(zip(self.layers, self.layouts)):
            entry = {"layer": layer}
            for modality, name in enumerate(MODALITIES):
                tokens = int(self.tokens[index, modality])
                slots = self.slots[index][modality].double()
                total = float(slots.sum())
                load = (slots / total).tolist() if total else [0.0] * layout.num_experts
                entry[name] = {
                    "tokens": tokens,
                    "group_load": {
                        group: sum(load[span]) for group, span in layout.group_slices().items()
                    },
                    "expert_load": load,
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
