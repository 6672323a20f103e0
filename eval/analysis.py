"""`asymoe analyze`: does a model's language side stay grounded in the image, layer by layer?

For each decoder layer, over the text tokens that follow the image (question, answer instruction, `ASSISTANT:`):

- evidence sensitivity: relative L2 change of the layer's FFN / MoE output when the image is blanked;
- attention on evidence: share of the layer's attention (eager weights, mean over heads) that lands on image tokens;
- for MoE layers, the sensitivity split by the group of each token's top expert, and the routing by modality and
  expert group (`asymoe.routing.RoutingStatistics`);
- for evidence layers, the reliance gate g, the size of the evidence injection g·W_o r relative to h and ‖W_o‖;
  for hyperbolic inter experts, the curvature and the size of the Möbius biases (0: Euclidean).

Works for every AsyMoE variant and for transformers' LLaVA (no routing there). See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageStat
from tqdm.auto import tqdm

from ..cli import DTYPES
from ..finetune.data import vqa_messages
from ..io import atomic_save_figure, atomic_write_text
from ..routing import GROUP_COLOURS, RoutingStatistics, plot_routing

BLANKS = ("mean", "zero")


def _rows(dataset, limit: int | None) -> list[dict]:
    """The first `limit` rows of a `datasets.Dataset` (or a list of dicts) in the VQA schema."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: give a positive number of examples (or None for all).")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rows = [dataset[index] for index in range(count)]
    if not rows:
        raise ValueError("the data set is empty: analysis needs at least one row with `image` and `question`.")
    if missing := {"image", "question"} - set(rows[0]):
        raise ValueError(f"the rows lack the column(s) {sorted(missing)}: analysis reads the project's VQA schema "
                         "(`image`, `question`), as `asymoe grounding` and `load_easy_vqa` write it.")
    return rows


def mean_colour_image(image: Image.Image) -> Image.Image:
    """An image of the same size filled with the image's mean RGB colour: same global colour, no content."""
    rgb = image.convert("RGB")
    return Image.new("RGB", rgb.size, tuple(round(value) for value in ImageStat.Stat(rgb).mean))


def text_after_image_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[batch, seq] bool: non-padding positions after the last image token of their row."""
    is_image = input_ids == image_token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(is_image, positions, -1).amax(dim=1, keepdim=True)
    return attention_mask.bool() & (positions > last_image) & (last_image >= 0)


def relative_change(original: torch.Tensor, blanked: torch.Tensor) -> torch.Tensor:
    """Per row ‖original − blanked‖ / ‖original‖ (0 where both are 0)."""
    original, blanked = original.float(), blanked.float()
    difference = (original - blanked).norm(dim=-1)
    return difference / original.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)


class _LayerProbe:
    """Forward hooks on every decoder layer: FFN outputs and attention mass on image keys at the selected query
    positions, and the top expert of each selected token in MoE layers."""

    def __init__(self, language_model):
        self.layers = list(language_model.layers)
        self.rows = self.image_keys = None

    @contextmanager
    def capture(self, rows: torch.Tensor, image_keys: torch.Tensor):
        """Record during the block; `rows` [batch, seq] selects query tokens, `image_keys` [batch, seq] image keys."""
        self.rows, self.image_keys = rows, image_keys
        self.ffn, self.attention, self.top_expert, self.gate, self.injection = {}, {}, {}, {}, {}
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.mlp.register_forward_hook(self._ffn_hook(index)))
            handles.append(layer.self_attn.register_forward_hook(self._attention_hook(index)))
            if hasattr(layer.mlp, "router"):
                handles.append(layer.mlp.router.register_forward_hook(self._router_hook(index)))
            if getattr(layer.mlp, "evidence", None) is not None:
                handles.append(layer.mlp.evidence.register_forward_hook(self._evidence_hook(index)))
                handles.append(layer.mlp.evidence.gate.register_forward_hook(self._gate_hook(index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _ffn_hook(self, index):
        def hook(module, args, output):
            self.ffn[index] = output[self.rows].float()
        return hook

    def _attention_hook(self, index):
        def hook(module, args, output):
            weights = output[1]
            if weights is None:
                raise RuntimeError("the attention returned no weights: analysis needs eager attention.")
            on_image = torch.einsum("bhqk,bk->bq", weights, self.image_keys.to(weights.dtype)) / weights.shape[1]
            self.attention[index] = on_image[self.rows].float()
        return hook

    def _evidence_hook(self, index):
        def hook(module, args, output):  # output = h + g * W_o r
            self.injection[index] = relative_change(args[0][self.rows], output[self.rows])  # ‖g W_o r‖ / ‖h‖
        return hook

    def _gate_hook(self, index):
        def hook(module, args, output):
            # The readout computes its gate from its first reader on (the model's `_first_evidence_reader`), which
            # comes before every selected row (a text token after the image): the gate's rows are a suffix.
            rows = self.rows[:, self.rows.shape[1] - output.shape[1]:]
            self.gate[index] = torch.sigmoid(output[rows].float()).squeeze(-1)
        return hook

    def _router_hook(self, index):
        def hook(module, args, output):
            _, top_weights, top_index = output
            best = top_index.gather(-1, top_weights.argmax(dim=-1, keepdim=True)).squeeze(-1)
            self.top_expert[index] = best[self.rows.reshape(-1)]
        return hook


@contextmanager
def _eager_attention(language_model):
    """Switch the decoder (only) to eager attention, whose weights the probe reads; restore it afterwards."""
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)


@contextmanager
def _zero_image_features(model):
    """Replace the projector's output (the image features) by zeros."""
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def analyze(model, processor, dataset, limit: int | None = None, batch_size: int = 8, blank: str = "mean",
            progress: bool = False) -> dict:
    """Per-layer evidence sensitivity, attention on evidence and (MoE layers) routing of `model` on `dataset`.

    `dataset`: rows with `image` (PIL) and `question`, prompted as the evaluation does. `blank`: `"mean"` replaces
    each image by its mean colour, `"zero"` zeroes the image features. Averages are over all text tokens after the
    image in the first `limit` rows. Returns a JSON-ready dict (see docs/analysis.md).
    """
    if blank not in BLANKS:
        raise ValueError(f"blank={blank!r} is not one of {BLANKS}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give a positive batch size.")
    rows = _rows(dataset, limit)
    model.eval()
    language_model = model.model.language_model
    text_config = model.config.get_text_config()
    moe_layers = list(getattr(text_config, "moe_layers", []))
    routing = RoutingStatistics(model.config) if moe_layers else None
    groups = {  # the expert groups text tokens can reach, per MoE layer
        index: {name: span for name, span in layer.mlp.layout.group_slices().items() if name != "vision"}
        for index, layer in enumerate(language_model.layers) if hasattr(layer.mlp, "router")
    }
    image_token_id = model.config.image_token_id
    device = next(model.parameters()).device
    num_layers = len(language_model.layers)
    sensitivity, attention = torch.zeros(num_layers, dtype=torch.float64), torch.zeros(num_layers, dtype=torch.float64)
    by_group = {index: {name: [0.0, 0] for name in names} for index, names in groups.items()}
    readout = {index: [0.0, 0.0] for index, layer in enumerate(language_model.layers)  # sums of g, injection
               if getattr(layer.mlp, "evidence", None) is not None}
    text_tokens = image_tokens = 0
    probe = _LayerProbe(language_model)

    def encode(images, prompts):
        # Right padding: every row keeps the positions it has alone, so results do not depend on the batching.
        inputs = processor(images=images, text=prompts, padding=True, padding_side="right",
                           return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        return inputs

    with _eager_attention(language_model):
        for start in tqdm(range(0, len(rows), batch_size), desc="analyze", disable=not progress, unit="batch"):
            batch = rows[start:start + batch_size]
            prompts = [processor.apply_chat_template(vqa_messages(row["question"]), add_generation_prompt=True)
                       for row in batch]
            images = [row["image"].convert("RGB") for row in batch]
            inputs = encode(images, prompts)
            is_image = inputs["input_ids"] == image_token_id
            selected = text_after_image_mask(inputs["input_ids"], inputs["attention_mask"], image_token_id)
            handles = routing.track(model) if routing is not None else []
            with probe.capture(selected, is_image):
                model(**inputs, use_cache=False)
            for handle in handles:
                handle.remove()
            original, top_expert = probe.ffn, probe.top_expert
            for index, mass in probe.attention.items():
                attention[index] += float(mass.sum())
            for index in probe.gate:
                readout[index][0] += float(probe.gate[index].sum())
                readout[index][1] += float(probe.injection[index].sum())
            if blank == "mean":
                blanked_inputs = encode([mean_colour_image(image) for image in images], prompts)
                blanking = nullcontext()
            else:
                blanked_inputs, blanking = inputs, _zero_image_features(model)
            with probe.capture(selected, is_image), blanking:
                model(**blanked_inputs, use_cache=False)
            for index in range(num_layers):
                change = relative_change(original[index], probe.ffn[index])
                sensitivity[index] += float(change.sum())
                for name, span in groups.get(index, {}).items():
                    in_group = (top_expert[index] >= span.start) & (top_expert[index] < span.stop)
                    by_group[index][name][0] += float(change[in_group].sum())
                    by_group[index][name][1] += int(in_group.sum())
            text_tokens += int(selected.sum())
            image_tokens += int((is_image & inputs["attention_mask"].bool()).sum())

    if text_tokens == 0:
        raise ValueError("no text tokens follow the image in these prompts: check the processor's chat template.")
    layers = []
    for index in range(num_layers):
        entry = {"layer": index, "moe": index in moe_layers,
                 "evidence_sensitivity": float(sensitivity[index]) / text_tokens,
                 "attention_on_evidence": float(attention[index]) / text_tokens}
        if index in by_group:
            entry["sensitivity_by_group"] = {
                name: {"value": total / count if count else None, "tokens": count}
                for name, (total, count) in by_group[index].items()
            }
        if index in readout:
            evidence = language_model.layers[index].mlp.evidence
            entry["evidence_readout"] = {"gate": readout[index][0] / text_tokens,
                                         "injection": readout[index][1] / text_tokens,
                                         "w_o_norm": float(evidence.o_proj.weight.float().norm())}
        if (hyperbolic := _hyperbolic_parameters(language_model.layers[index].mlp)) is not None:
            entry["hyperbolic"] = hyperbolic
        layers.append(entry)
    return {
        "model": {"model_type": model.config.model_type, "moe_variant": getattr(text_config, "moe_variant", "dense"),
                  "num_layers": num_layers, "moe_layers": moe_layers,
                  "evidence_layers": list(getattr(text_config, "evidence_layers", []))},
        "blank": blank,
        "examples": len(rows),
        "text_tokens": text_tokens,
        "image_tokens": image_tokens,
        "layers": layers,
        "routing": routing.summary() if routing is not None else [],
    }


def _hyperbolic_parameters(mlp) -> dict | None:
    """Curvature c and mean Möbius-bias norm ‖β‖ per inter expert of a layer with hyperbolic experts, else None."""
    experts = getattr(mlp, "experts", None)
    if getattr(experts, "mobius_bias_down", None) is None:
        return None
    return {"curvature": float(experts.curvature),
            "mobius_bias_norm": {which: float(getattr(experts, f"mobius_bias_{which}").float().norm(dim=-1).mean())
                                 for which in ("gate_up", "down")}}


def plot_analysis(results_by_name: dict[str, dict], output_dir: str | os.PathLike) -> list[Path]:
    """PNG plots of `analyze` results, one line per model: evidence sensitivity and attention on evidence per layer,
    sensitivity by expert group (models with MoE layers) and each MoE model's routing. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not results_by_name:
        raise ValueError("no results to plot: pass {name: analyze(...)} for at least one model.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, filename in (
        ("evidence_sensitivity", "relative FFN change, image blanked", "evidence_sensitivity.png"),
        ("attention_on_evidence", "attention mass on image tokens", "attention_on_evidence.png"),
    ):
        figure, axis = plt.subplots(figsize=(5.5, 3.4))
        for name, results in results_by_name.items():
            layers = [entry["layer"] for entry in results["layers"]]
            axis.plot(layers, [entry[key] for entry in results["layers"]], marker="o", label=name)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("decoder layer")
        axis.set_ylabel(label)
        axis.set_title(f"{key.replace('_', ' ')} (text tokens after the image)", fontsize=10)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(atomic_save_figure(figure, output / filename))

    moe_results = {name: results for name, results in results_by_name.items()
                   if any("sensitivity_by_group" in entry for entry in results["layers"])}
    if moe_results:
        figure, axes = plt.subplots(1, len(moe_results), figsize=(3.6 * len(moe_results) + 1.2, 3.2), squeeze=False,
                                    layout="constrained")
        present = [group for group in GROUP_COLOURS if any(
            group in entry.get("sensitivity_by_group", {}) for results in moe_results.values()
            for entry in results["layers"])]
        width = 0.8 / len(present)
        handles = {}
        for axis, (name, results) in zip(axes[0], moe_results.items()):
            moe_entries = [entry for entry in results["layers"] if "sensitivity_by_group" in entry]
            for offset, group in enumerate(present):
                values = [(entry["sensitivity_by_group"].get(group) or {}).get("value") or 0.0
                          for entry in moe_entries]
                handles[group] = axis.bar([i + offset * width for i in range(len(moe_entries))], values, width,
                                          color=GROUP_COLOURS[group], label=group)
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(moe_entries))],
                            [f"L{entry['layer']}" for entry in moe_entries])
            axis.set_title(name, fontsize=10)
            axis.set_xlabel("MoE layer")
        axes[0][0].set_ylabel("relative FFN change")
        figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8,
                      title="top expert's group", title_fontsize=8)
        figure.suptitle("Evidence sensitivity of text tokens by the group of their top expert", fontsize=10)
        paths.append(atomic_save_figure(figure, output / "sensitivity_by_group.png"))
    for name, results in results_by_name.items():
        if results["routing"]:
            paths.append(plot_routing(results["routing"], output / f"routing_{_file_safe(name)}.png",
                                      title=f"Routing by modality: {name}"))
    return paths


def _file_safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)


def load_analysis_data(source: str, split: str = "test_counter", limit: int | None = None):
    """`source`: a directory written by `asymoe grounding` (a DatasetDict; `split` is read), a `save_to_disk`
    Dataset directory, or `easy_vqa` (the easy-vqa test set, offline; `limit` questions drawn with a fixed seed)."""
    import datasets

    if source == "easy_vqa":
        from .easy_vqa import load_easy_vqa

        return load_easy_vqa("test", limit=limit)
    path = Path(source)
    if (path / "dataset_dict.json").is_file():
        from .grounding import load_grounding

        splits = load_grounding(path)
        if split not in splits:
            raise ValueError(f"{path} has the splits {list(splits)}, not {split!r}: pass --split with one of them.")
        return splits[split]
    if (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    raise FileNotFoundError(f"--data {source}: not a data set directory (save_to_disk) nor `easy_vqa`; create the "
                            f"grounding benchmark with `asymoe grounding {source}`.")


def _model_names(models: list[str]) -> list[str]:
    """Shortest path suffixes that tell the models apart (`runs/asymoe/model` → `asymoe/model`)."""
    parts = [Path(model).parts or (model,) for model in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same model is given twice: {models}.")


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe analyze`'s arguments, on `parser` (the `asymoe` subcommand's) or a new parser."""
    parser = parser or argparse.ArgumentParser(prog="asymoe analyze", description=__doc__)
    parser.add_argument("models", metavar="MODEL", nargs="+", help="model directories or Hub ids (AsyMoE or LLaVA)")
    parser.add_argument("--data", required=True, metavar="DIR_OR_DATASET",
                        help="`asymoe grounding` directory, a save_to_disk Dataset directory, or easy_vqa")
    parser.add_argument("--split", default="test_counter", help="split of a DatasetDict (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=64, help="first N examples (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blank", default="mean", choices=BLANKS,
                        help="mean: image → its mean colour; zero: image features → 0 (default: %(default)s)")
    parser.add_argument("--names", help="comma-separated labels of the models (default: their paths' last parts)")
    parser.add_argument("--output", default="outputs/analysis", help="results directory (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    return parser


def main(args: argparse.Namespace) -> int:
    """Analyse each MODEL on the data; write analysis.json and the plots."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        names = args.names.split(",") if args.names else _model_names(args.models)
        if len(names) != len(args.models) or len(set(names)) != len(names):
            raise ValueError(f"--names needs {len(args.models)} distinct labels, got {names}.")
        dataset = load_analysis_data(args.data, args.split, args.limit)
        results = {}
        for name, source in zip(names, args.models):
            model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True,
                                                                dtype=DTYPES[args.dtype]).to(args.device)
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            results[name] = analyze(model, processor, dataset, args.limit, args.batch_size, args.blank, progress=True)
            del model
    except (ValueError, OSError) as err:  # OSError: a missing data or model path
        print(f"asymoe analyze: error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output)
    record = {"models": dict(zip(names, args.models)), "data": args.data, "split": args.split, "results": results}
    atomic_write_text(output / "analysis.json", json.dumps(record, indent=2))
    for path in plot_analysis(results, output):
        print(f"wrote {path}")
    print(f"wrote {output / 'analysis.json'}")
    return 0
