"""`RoutingCallback`: per-layer, per-modality expert load and router entropy in the trainer logs, a plot at the end."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from ..io import atomic_write_text
from ..routing import RoutingStatistics, plot_routing


class RoutingCallback(TrainerCallback):
    """Collects routing over the forwards between two logging steps and adds it to the logs
    (`routing/L3/text/inter`: share of layer 3's top-k slots of text tokens that went to inter experts;
    `routing/L3/text/imbalance`: the most loaded reachable expert's share over the mean share, 1 = balanced;
    `routing/L3/text/entropy`: normalised router entropy). At the end of training writes the routing of the whole
    run to `<output_dir>/routing.json` and `<output_dir>/routing.png`. Under data parallelism the counts of all ranks
    are summed before logging and saving."""

    def __init__(self):
        self.window = self.total = None
        self.handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(model.config.get_text_config(), "moe_layers", None):  # dense: nothing
            return
        self.window, self.total = RoutingStatistics(model.config), RoutingStatistics(model.config)
        self.handles = [*self.window.track(model), *self.total.track(model)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.window is None or logs is None or "loss" not in logs:
            return
        self.window.all_reduce(args.device)  # every rank logs the training loss, so every rank gets here
        scalars = self.window.log_scalars()
        logs.update(scalars)  # seen by the callbacks after this one (pass it first to reach the reporters)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # the trainer stored its copy before calling back
        self.window.reset()

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.total is None:
            return
        self.total.all_reduce(args.device)
        if not state.is_world_process_zero:
            return
        summary = self.total.summary()
        output = Path(args.output_dir)
        atomic_write_text(output / "routing.json", json.dumps(summary, indent=2))
        plot_routing(summary, output / "routing.png", title=f"Routing over {state.global_step} training steps")
