"""How evenly experts are used after training, by balancing method: none, loss-free router biases (the default, at
two rates) and the per-modality Switch loss on the model's own loss.

A tiny AsyMoE (random init, `asymoe.tiny`) is trained from scratch on the grounding benchmark's training split with
one plain AdamW loop per method (same seed, same batches; the model's own loss, so that the Switch loss can enter),
then routed over the validation split. Reported per method: the load imbalance of each MoE layer and modality (the
most loaded reachable expert's share of top-k slots over the mean share: 1 = balanced; the worst possible is the
number of reachable experts / top-k) and the final training loss.

    python experiments/balance.py --steps 300 --seeds 0 1 2 --output outputs/balance
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from asymoe import AsyMoEForConditionalGeneration
from asymoe.eval.grounding import GroundingConfig, build_grounding, grounding_vocabulary
from asymoe.finetune.data import SHORT_ANSWER_PROMPT, vqa_messages
from asymoe.io import atomic_write_text
from asymoe.routing import MODALITIES, RoutingStatistics
from asymoe.tiny import build_tokenizer, tiny_config, tiny_processor

METHODS = {
    "none": {"router_bias_update_rate": 0.0},
    "loss-free 1e-3 (default)": {"router_bias_update_rate": 1e-3},
    "loss-free 1e-2": {"router_bias_update_rate": 1e-2},
    "Switch loss 0.01": {"router_bias_update_rate": 0.0, "router_aux_loss_coef": 0.01, "output_router_logits": True},
}


def batches(processor, rows, batch_size: int):
    """Processor inputs with labels (padding ignored; the model ignores image positions itself)."""
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[start:start + batch_size]
        texts = [processor.apply_chat_template(vqa_messages(row["question"], row["answer"])) for row in chunk]
        inputs = processor(images=[row["image"] for row in chunk], text=texts, padding=True, return_tensors="pt")
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        yield inputs


def run(method: dict, seed: int, data, processor, tokenizer, steps: int, batch_size: int) -> dict:
    torch.manual_seed(seed)
    model = AsyMoEForConditionalGeneration(tiny_config(tokenizer, **method)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    train = data["train"].shuffle(seed=seed)
    rows = [train[i % len(train)] for i in range(steps * batch_size)]
    losses = []
    for inputs in batches(processor, rows, batch_size):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    stats = RoutingStatistics(model.config)
    handles = stats.track(model.eval())
    with torch.no_grad():
        for inputs in batches(processor, list(data["validation"]), batch_size):
            model(**inputs)
    for handle in handles:
        handle.remove()
    imbalance = {f"L{entry['layer']}/{modality}": entry[modality]["imbalance"]
                 for entry in stats.summary() for modality in MODALITIES}
    return {"imbalance": imbalance, "final_loss": statistics.mean(losses[-20:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", default="outputs/balance")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(grounding_vocabulary() + SHORT_ANSWER_PROMPT.split())
    processor = tiny_processor(tiny_config(tokenizer), tokenizer)
    results: dict[str, dict[int, dict]] = {name: {} for name in METHODS}
    for seed in args.seeds:
        data = build_grounding(GroundingConfig(seed=seed, train_size=2000, validation_size=256, test_size=0))
        for name, method in METHODS.items():
            results[name][seed] = run(method, seed, data, processor, tokenizer, args.steps, args.batch_size)
            print(name, seed, json.dumps(results[name][seed]), flush=True)
    lines = ["| method | " + " | ".join(next(iter(results["none"].values()))["imbalance"]) + " | final loss |",
             "|---|" + "---|" * (len(next(iter(results["none"].values()))["imbalance"]) + 1)]
    for name, per_seed in results.items():
        keys = next(iter(per_seed.values()))["imbalance"]
        cells = [f"{statistics.mean(r['imbalance'][k] for r in per_seed.values()):.2f}" for k in keys]
        loss = statistics.mean(r["final_loss"] for r in per_seed.values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss:.3f} |")
    table = "\n".join(lines)
    output = Path(args.output)
    atomic_write_text(output / "balance.json", json.dumps({"args": vars(args), "results": results}, indent=2))
    atomic_write_text(output / "balance.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
