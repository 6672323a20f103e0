"""An interpreter that can import only torch, transformers, safetensors, pillow and what they need — where a user
without the asymoe package loads a checkpoint's remote code — and the scripts the tests run there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ALLOWED_DISTRIBUTIONS = ["torch", "transformers", "safetensors", "pillow"]
AUTO_CLASSES = ["AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel"]


def closure(names: list[str]) -> set[str]:
    """Distributions `names` need at run time (their non-extra requirements, recursively)."""
    seen, pending = set(), list(names)
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def isolated_site(directory: Path) -> Path:
    """A folder linking the modules and metadata of the allowed distributions' closure, nothing else."""
    site = directory / "site"
    site.mkdir()
    for name in closure(ALLOWED_DISTRIBUTIONS):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if top.endswith(".pth") or top == "__pycache__" or not source.exists():
                continue
            target = site / top
            if not target.exists():
                target.symlink_to(source)
    assert not (site / "asymoe").exists()
    return site


def run_isolated(tmp_path: Path, script: str, *args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    """Run `script` with `args` in an interpreter that sees only `site` (default: the allowed distributions)."""
    site = site or isolated_site(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONNOUSERSITE="1")
    (tmp_path / "run.py").write_text(script)
    code = f"import sys; sys.path.insert(0, {str(site)!r}); exec(compile(open('run.py').read(), 'run.py', 'exec'))"
    return subprocess.run(
        [sys.executable, "-S", "-s", "-c", code, *args], capture_output=True, text=True, env=env, timeout=600,
        cwd=tmp_path,
    )


ISOLATED_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("asymoe") is None, "asymoe must not be importable here"
    for name in ("trl", "peft", "datasets", "evaluate", "accelerate"):
        assert importlib.util.find_spec(name) is None, name + " must not be importable here"
    import numpy as np, torch
    from PIL import Image
    import transformers
    from transformers import AutoConfig, AutoProcessor, pipeline
    directory, auto_classes = sys.argv[1], sys.argv[2].split(",")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    result = {"config": type(config).__name__, "processor": type(processor).__name__, "models": {}}
    for name in auto_classes:
        model = getattr(transformers, name).from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        result["models"][name] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "logits_sum": float(logits.double().sum()),
            "new_tokens": generated[0, inputs["input_ids"].shape[1]:].tolist(),
        }
    pipe = pipeline("image-text-to-text", model=directory, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what ?"}]}]
    reply = pipe(text=chat, max_new_tokens=3)[0]["generated_text"][-1]
    result["pipeline"] = {"role": reply["role"], "content": str(reply["content"])}
    print("RESULT " + json.dumps(result))
    """
)



# Per upcycled checkpoint (argv: a JSON list of [checkpoint, inputs.pt]): greedy tokens with and without the KV cache,
# through the checkpoint's own code.
GENERATION_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("asymoe") is None, "asymoe must not be importable here"
    import torch
    from transformers import AutoModelForImageTextToText
    result = {}
    for directory, inputs_file in json.loads(sys.argv[1]):
        model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load(inputs_file)
        result[directory] = {
            name: model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                                 use_cache=cached).tolist()
            for name, cached in (("cached", True), ("uncached", False))
        }
    print("RESULT " + json.dumps(result))
    """
)


def remote_generations(tmp_path: Path, checkpoints: dict[str, dict]) -> dict[str, dict[str, list]]:
    """Greedy tokens of each checkpoint (`{directory: inputs}`), cached and uncached, from its remote code in the
    isolated interpreter: `{directory: {"cached": [...], "uncached": [...]}}`."""
    import torch

    jobs = []
    for index, (directory, inputs) in enumerate(checkpoints.items()):
        inputs_file = tmp_path / f"inputs-{index}.pt"
        torch.save(dict(inputs), inputs_file)
        jobs.append([str(directory), str(inputs_file)])
    proc = run_isolated(tmp_path, GENERATION_SCRIPT, json.dumps(jobs))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
