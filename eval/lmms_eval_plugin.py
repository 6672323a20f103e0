"""The lmms-eval model `asymoe`: `lmms-eval --model asymoe --model_args pretrained=DIR,trust_remote_code=True ...`.

lmms-eval (0.7) finds models of installed packages through the `lmms_eval.models` entry-point group; asymoe
registers `manifest` there (pyproject.toml). The model is any checkpoint `asymoe eval` runs (AsyMoE or a dense
LLaVA baseline), prompted and decoded by the same code (`asymoe.eval.generation`): each request's images as image
placeholders before its text, in the processor's chat template. lmms-eval itself is not a dependency of
asymoe; see docs/evaluation.md for installing it next to asymoe.
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..cli import DTYPES
from .generation import chat_prompts, generate_batch, model_inputs

DEFAULT_MAX_NEW_TOKENS = 1024  # as lmms-eval's Hugging Face models, for tasks that set none


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: the model id `asymoe` and its class."""
    return ModelManifest(model_id="asymoe", simple_class_path=f"{__name__}.AsyMoELmms")


class AsyMoELmms(lmms):
    """An image-text-to-text checkpoint behind lmms-eval's model API (`generate_until`, `loglikelihood`).

    Args (lmms-eval's `--model_args`, plus its `--batch_size` and `--device`):
        pretrained: checkpoint directory or Hub id.
        trust_remote_code: load the checkpoint's own code (AsyMoE checkpoints ship it).
        dtype: "fp32" (default), "bf16" or "fp16".
        batch_size: requests generated together (left padding).
        device: default "cuda" when available, else "cpu".
    """

    def __init__(self, pretrained: str, trust_remote_code: bool = False, dtype: str = "fp32",
                 batch_size: int | str = 1, device: str | None = None) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype}: choose one of {sorted(DTYPES)}.")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size {batch_size}: the asymoe model takes a positive number of requests.")
        self.batch_size = int(batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype]).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self._cache_checked = False  # greedy answers with and without the cache compared once (the canary)

    def _images(self, doc_to_visual, doc_id: int, task: str, split: str) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not all(isinstance(visual, Image.Image) for visual in visuals):
            raise ValueError(f"task {task} gives {sorted({type(v).__name__ for v in visuals})} visuals; the asymoe "
                             "model reads images (PIL) only.")
        return [visual.convert("RGB") for visual in visuals]

    def generate_until(self, requests) -> list[str]:
        """Answers to `(context, generation_kwargs, doc_to_visual, doc_id, task, split)` requests: greedy unless the
        task asks for sampling, cut at the first of the task's `until` strings, stripped. The first greedy batch is
        also decoded without the KV cache: a mismatch stops the run (`CachedGenerationMismatch`)."""
        answers = [None] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            groups = {}  # requests that generate together: same settings, same number of images
            for index in range(start, min(start + self.batch_size, len(requests))):
                context, settings, doc_to_visual, doc_id, task, split = requests[index].args
                images = self._images(doc_to_visual, doc_id, task, split)
                key = json.dumps(settings, sort_keys=True, default=str), len(images)
                groups.setdefault(key, (settings, []))[1].append((index, context, images))
            for settings, group in groups.values():
                until, generate_kwargs = _generation_settings(settings)
                check = not self._cache_checked and not generate_kwargs["do_sample"]  # the canary: once, greedy
                texts = generate_batch(self.model, self.processor, [context for _, context, _ in group],
                                       [images for *_, images in group], check_cache=check, **generate_kwargs)
                self._cache_checked |= check
                for (index, *_), text in zip(group, texts):
                    answers[index] = _cut(text, until)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """For `(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)` requests: the summed
        log-probability of the continuation after the context's chat-template turn, and whether greedy decoding
        would produce it."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = [self._images(doc_to_visual, doc_id, task, split)]
            prefix = chat_prompts(self.processor, [context], images)[0]
            prefix_length = model_inputs(self.model, self.processor, [prefix], images)["input_ids"].shape[1]
            inputs = model_inputs(self.model, self.processor, [prefix + continuation], images)
            logits = self.model(**inputs).logits[0, prefix_length - 1:-1].float()
            tokens = inputs["input_ids"][0, prefix_length:]
            log_prob = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).sum()
            results.append((log_prob.item(), bool((logits.argmax(-1) == tokens).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the asymoe lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported.")


def _generation_settings(task_kwargs: dict) -> tuple[list[str], dict]:
    """lmms-eval's generation_kwargs -> (until strings, `generate_batch` keyword arguments)."""
    settings = dict(task_kwargs)
    until = settings.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    settings.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    temperature = settings.pop("temperature", 0)
    top_p = settings.pop("top_p", None)
    if settings.get("do_sample", temperature > 0):
        settings.update(do_sample=True, temperature=temperature, **({"top_p": top_p} if top_p is not None else {}))
    else:
        settings["do_sample"] = False
    return until, settings


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
