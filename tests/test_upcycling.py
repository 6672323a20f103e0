"""Upcycling dense LLaVA checkpoints (Llama, Mistral, Qwen2, Qwen3 backbones) into AsyMoE: copy mode keeps the
logits and greedy generations, partition mode activates fewer parameters, every key layout transformers has saved
LLaVA in is read, output is written atomically, unsupported sources fail clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from isolated import remote_generations

from asymoe import AsyMoEForConditionalGeneration
from asymoe.cli import main as cli_main
from asymoe.tiny import build_tokenizer
from asymoe.upcycling import (
    CRASH_HOOK_ENV,
    deviation_report,
    parameter_counts,
    partition_slices,
    probe_inputs,
    upcycle,
)

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "vanilla", "modality", "asymoe")
WORDS = "what color is the shape red green blue circle square triangle".split()
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }} : "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8, "projection_dim": 32}
# One backbone per row, each exercising its architecture flags.
BACKBONES = {
    "llama": (LlamaConfig, {"attention_bias": True}, "clip", {"vision_feature_layer": [-2, -1]}),
    "mistral": (MistralConfig, {"sliding_window": 12, "head_dim": 16}, "clip", {}),
    "qwen2": (Qwen2Config, {"tie_word_embeddings": True}, "siglip", {"vision_feature_select_strategy": "full"}),
    "qwen3": (Qwen3Config, {"head_dim": 24}, "clip", {"vision_feature_layer": -1}),
}


def _build_source(directory: Path, backbone: str, seed: int = 0, **save_kwargs) -> Path:
    """A tiny random LlavaForConditionalGeneration + LlavaProcessor saved to `directory` (non-trivial weights)."""
    text_cls, text_extra, vision, top_extra = BACKBONES[backbone]
    tokenizer = build_tokenizer(WORDS)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    text_config = text_cls(vocab_size=len(tokenizer), **TEXT, **special, **text_extra)
    if vision == "clip":
        vision_config = CLIPVisionConfig(**CLIP)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        vision_config = SiglipVisionConfig(**{k: v for k, v in CLIP.items() if k != "projection_dim"})
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=text_extra.get("tie_word_embeddings", False), **top_extra,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger-than-init weights, so that every tensor (biases too) visibly matters
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1 and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    model.save_pretrained(directory, **save_kwargs)
    strategy = config.vision_feature_select_strategy
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=TEMPLATE,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1 if vision == "clip" else 0,
    )
    processor.save_pretrained(directory)
    return directory


def _images(count: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((30 + 9 * i, 41, 3)) * 255).astype("uint8")) for i in range(count)]


def _inputs(processor) -> dict:
    """A left-padded batch of two prompts with one image each."""
    texts = ["USER : <image> what color is the shape ? ASSISTANT :", "USER : <image> shape ? ASSISTANT :"]
    batch = processor(images=_images(), text=texts, padding=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _generate(model, inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per backbone: source directory, source logits and greedy continuation on the source processor's batch."""
    root = tmp_path_factory.mktemp("sources")
    result = {}
    for backbone in BACKBONES:
        directory = _build_source(root / backbone, backbone)
        model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
        processor = AutoProcessor.from_pretrained(directory)
        inputs = _inputs(processor)
        with torch.no_grad():
            logits = model(**inputs).logits
        result[backbone] = {"dir": directory, "model": model, "inputs": inputs, "logits": logits,
                            "generated": _generate(model, inputs)}
    return result


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    """The llama source saved in many small shards (FFN pieces of one layer land in different shards)."""
    directory = _build_source(tmp_path_factory.mktemp("sharded") / "llama", "llama", max_shard_size="40KB")
    assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(directory.glob("*.safetensors"))) >= 4
    return directory


def _check_same_function(source: dict, output: Path, make_inputs=None) -> None:
    """The upcycled checkpoint's processor reproduces the source's inputs (`make_inputs(processor)`, default
    `_inputs`) and its model the source's logits and greedy generation on them."""
    model, info = AsyMoEForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    model.eval()
    processor = AutoProcessor.from_pretrained(output)
    assert type(processor).__name__ == "AsyMoEProcessor"
    inputs = (make_inputs or _inputs)(processor)
    assert inputs.keys() == source["inputs"].keys()
    for key in inputs.keys() - {"pixel_values"}:  # ids, mask, and anyres image_sizes / batch_num_images
        assert torch.equal(inputs[key], source["inputs"][key]), key
    assert torch.allclose(inputs["pixel_values"], source["inputs"]["pixel_values"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - source["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(_generate(model, inputs), source["generated"])


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_copy_mode_keeps_logits_and_generation(backbone, sources, tmp_path):
    """Every variant upcycled in copy mode computes the source's logits and greedy generations."""
    source = sources[backbone]
    for variant in VARIANTS:
        output = upcycle(source["dir"], tmp_path / variant, moe_variant=variant, seed=3)
        _check_same_function(source, output)
        config = json.loads((output / "config.json").read_text())
        manifest = config["upcycling"]
        assert manifest["mode"] == "copy" and manifest["seed"] == 3 and manifest["function_preserving"]
        assert manifest["source_text_model_type"] == backbone
        assert set(manifest["layers"]) == {str(i) for i in config["text_config"]["moe_layers"]}
        assert bool(config["text_config"]["moe_layers"]) == (variant != "dense")
        for name in ("configuration_asymoe.py", "modeling_asymoe.py", "hyperbolic_asymoe.py",
                     "processing_asymoe.py", "README.md", "model.safetensors.index.json"):
            assert (output / name).is_file(), name
        card = (output / "README.md").read_text()
        assert f"AsyMoE ({variant})" in card and '"mode": "copy"' in card


def test_copy_mode_generation_through_remote_code(sources, tmp_path):
    """Where asymoe is not installed, every backbone x variant loads with `trust_remote_code`, and its greedy tokens
    with the KV cache equal those without it and the dense source's (transformers' LLaVA)."""
    checkpoints = {str(upcycle(sources[backbone]["dir"], tmp_path / f"{backbone}-{variant}", moe_variant=variant)):
                   (backbone, variant) for backbone in BACKBONES for variant in VARIANTS}
    generations = remote_generations(tmp_path, {
        directory: sources[backbone]["inputs"] for directory, (backbone, _) in checkpoints.items()})
    for directory, (backbone, variant) in checkpoints.items():
        expected = sources[backbone]["generated"].tolist()
        assert generations[directory]["cached"] == generations[directory]["uncached"] == expected, (backbone, variant)


def test_qwen3_and_mistral_flags_reach_the_config(sources, tmp_path):
    qwen3 = json.loads((upcycle(sources["qwen3"]["dir"], tmp_path / "q3") / "config.json").read_text())
    assert qwen3["text_config"]["use_qk_norm"] and qwen3["text_config"]["head_dim"] == 24
    mistral = json.loads((upcycle(sources["mistral"]["dir"], tmp_path / "m") / "config.json").read_text())
    assert mistral["text_config"]["sliding_window"] == 12
    qwen2 = json.loads((upcycle(sources["qwen2"]["dir"], tmp_path / "q2") / "config.json").read_text())
    assert qwen2["text_config"]["qkv_bias"] and qwen2["tie_word_embeddings"]


def _rewrite_keys(source: Path, target: Path, rename) -> Path:
    """Copy a checkpoint with every tensor key renamed (shards and index kept)."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            tensors = {rename(k): v for k, v in load_file(path).items()}
            save_file(tensors, target / path.name, metadata={"format": "pt"})
        elif path.name == "model.safetensors.index.json":
            index = json.loads(path.read_text())
            index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
            (target / path.name).write_text(json.dumps(index))
        else:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def _v452_layout(key: str) -> str:  # transformers 4.52-4.57: model.language_model / model.vision_tower.vision_model
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _hub_legacy_layout(key: str) -> str:  # llava-hf checkpoints before 4.52
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def test_sharded_sources_and_every_key_layout(sources, sharded_source, tmp_path):
    """Multi-shard sources (FFN pieces split across shards) in all LLaVA key layouts; multi-shard output."""
    source = sources["llama"]
    # The sharded source holds the same weights as the single-file one (same seed).
    for name, directory in (
        ("sharded", sharded_source),
        ("v452", _rewrite_keys(sharded_source, tmp_path / "src_v452", _v452_layout)),
        ("hub-legacy", _rewrite_keys(source["dir"], tmp_path / "src_legacy", _hub_legacy_layout)),
    ):
        output = upcycle(directory, tmp_path / name, moe_variant="asymoe", max_shard_size="60KB")
        index = json.loads((output / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 3 and shards == sorted(p.name for p in output.glob("*.safetensors"))
        _check_same_function(source, output)


def test_partition_mode_activates_fewer_parameters(sources, tmp_path):
    source = sources["llama"]
    copy_counts = parameter_counts(AsyMoEForConditionalGeneration.from_pretrained(
        upcycle(source["dir"], tmp_path / "copy")).config)
    output = upcycle(source["dir"], tmp_path / "partition", mode="partition", seed=1)
    model = AsyMoEForConditionalGeneration.from_pretrained(output).eval()
    text = model.config.text_config
    assert text.moe_intermediate_size == 128 // 4  # asymoe: text tokens reach 4 experts in evidence layers
    counts = parameter_counts(model.config)
    activated = counts["language_model_activated"]
    assert activated < counts["dense_language_model"] < copy_counts["language_model_activated"]
    manifest = model.config.upcycling
    assert manifest["num_slices"] == 4 and not manifest["function_preserving"]
    # Each expert holds its slice of the dense FFN (down_proj scaled by top-k).
    dense = source["model"].model.language_model.layers[3].mlp
    block = model.model.language_model.layers[3].mlp
    for expert, piece in enumerate(partition_slices(block.layout, 4)):
        rows = slice(piece * 32, (piece + 1) * 32)
        gate_up = torch.cat([dense.gate_proj.weight[rows], dense.up_proj.weight[rows]])
        assert torch.equal(block.experts.gate_up_proj[expert], gate_up)
        assert torch.allclose(block.experts.down_proj[expert], 2 * dense.down_proj.weight[:, rows])
    with torch.no_grad():
        logits = model(**source["inputs"]).logits
    assert torch.isfinite(logits).all() and logits.shape == source["logits"].shape

    noisy = AsyMoEForConditionalGeneration.from_pretrained(
        upcycle(source["dir"], tmp_path / "noisy", mode="copy", noise_std=0.05, drop_ratio=0.25, seed=2))
    experts = noisy.model.language_model.layers[1].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    assert not noisy.config.upcycling["function_preserving"]


def test_from_dense_in_memory(sources):
    """from_dense of a directory or of a model: the source's logits, and no warning about processors (the returned
    model has none either way)."""
    source = sources["qwen2"]
    for dense in (source["dir"], source["model"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AsyMoEForConditionalGeneration.from_dense(dense, moe_variant="asymoe").eval()
        assert not [w for w in caught if "processor" in str(w.message)]
        with torch.no_grad():
            logits = model(**source["inputs"]).logits
        assert (logits - source["logits"]).abs().max().item() <= 1e-4
    rows = deviation_report(source["model"], model, probe_inputs(model.config))
    names = [row["name"] for row in rows]
    assert names[0] == "image features" and names[-1] == "logits" and "layer 1" in names
    assert max(row["max_abs"] for row in rows) <= 1e-4


def test_in_memory_source_to_directory_says_it_has_no_processor(sources, tmp_path):
    with pytest.warns(UserWarning, match="in-memory model, which carries no processor"):
        path = upcycle(sources["qwen2"]["model"], tmp_path / "upcycled", moe_variant="asymoe")
    assert (path / "config.json").is_file() and not (path / "processor_config.json").exists()


def test_hub_id_from_local_cache(sources, tmp_path, monkeypatch):
    """A Hub id resolves through the local cache when offline; the manifest records the snapshot's commit."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--llava-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in sources["llama"]["dir"].iterdir():
        (snapshot / path.name).symlink_to(path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    output = upcycle("tiny/llava-llama", tmp_path / "out", moe_variant="vanilla")
    manifest = json.loads((output / "config.json").read_text())["upcycling"]
    assert manifest["source"] == "tiny/llava-llama" and manifest["revision"] == commit
    assert "base_model: tiny/llava-llama" in (output / "README.md").read_text()
    with pytest.raises(ValueError, match="neither a local directory nor a Hub model id"):
        upcycle("tiny/not-cached", tmp_path / "nothing")


def test_cli_upcycle_and_report(sources, tmp_path, capsys):
    output = tmp_path / "cli"
    code = cli_main(["upcycle", str(sources["mistral"]["dir"]), str(output), "--variant", "modality",
                     "--experts", "2,2,0,0", "--seed", "5", "--num-experts-per-tok", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "MoE layer 1: vision 2, text 2, inter 0, evidence 0" in captured.out
    report = captured.out.split("deviation from the source")[1].splitlines()[2:]
    assert report[-1].startswith("logits")
    assert max(float(line.split()[-2]) for line in report) <= 1e-4
    config = json.loads((output / "config.json").read_text())
    assert config["text_config"]["num_experts_per_tok"] == 1 and config["upcycling"]["seed"] == 5
    # An existing output is refused without --overwrite, replaced with it.
    assert cli_main(["upcycle", str(sources["mistral"]["dir"]), str(output), "--no-report"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["upcycle", str(sources["mistral"]["dir"]), str(output), "--no-report", "--overwrite"]) == 0
    assert json.loads((output / "config.json").read_text())["upcycling"]["moe_variant"] == "asymoe"


def test_killed_upcycle_leaves_no_checkpoint(sharded_source, tmp_path):
    """SIGKILL after the first source shard: nothing appears at DST; a rerun cleans up, says so, and succeeds."""
    output = tmp_path / "killed"
    env = {**os.environ, CRASH_HOOK_ENV: "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "asymoe.cli", "upcycle", str(sharded_source), str(output), "--no-report"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not output.exists()
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.rglob("model.safetensors.index.json"))
    (partial,) = tmp_path.glob(".killed.partial-*")  # the half-written work stayed in the hidden temp dir
    assert any(p.stat().st_size > 0 for p in partial.glob("*.safetensors"))
    with pytest.warns(UserWarning, match=f"removed {partial.name}, an interrupted write of {output}"):
        assert upcycle(sharded_source, output) == output.absolute()
    assert (output / "config.json").is_file()
    assert not list(tmp_path.glob(".killed.*"))  # the rerun cleaned up after the killed one


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_interrupted_overwrite_is_recovered(sources, tmp_path, capsys):
    """A crash inside --overwrite's swap leaves DST missing, the old checkpoint in a hidden `.replaced-*` sibling
    and the new one half-moved: the next run puts the old checkpoint back, removes the rest, and says so."""
    source, output = sources["llama"]["dir"], tmp_path / "out"
    upcycle(source, output, moe_variant="modality")
    before = (output / "config.json").read_text()
    pid = _dead_pid()
    output.rename(tmp_path / f".out.replaced-{pid}-0a1b2c3d")
    (tmp_path / f".out.partial-{pid}-4e5f6a7b").mkdir()
    (tmp_path / f".out.partial-{pid}-4e5f6a7b" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning) as caught:
        assert cli_main(["upcycle", str(source), str(output), "--no-report"]) == 2  # DST is back: not empty
    messages = " ".join(str(w.message) for w in caught)
    assert f"restored {output}" in messages and f"removed .out.partial-{pid}-4e5f6a7b" in messages
    assert "not empty" in capsys.readouterr().err
    assert (output / "config.json").read_text() == before
    assert not list(tmp_path.glob(".out.*"))


def test_bad_destinations_fail_clearly_and_leave_the_source(sources, tmp_path, capsys):
    source = sources["llama"]["dir"]
    files = {path: path.read_bytes() for path in source.iterdir()}
    for destination in (source, source / "inside"):
        assert cli_main(["upcycle", str(source), str(destination), "--overwrite", "--no-report"]) == 2
        assert "upcycling would replace the source" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in source.iterdir()} == files
    assert cli_main(["upcycle", str(source), "/sys/asymoe-upcycled", "--no-report"]) == 2  # not writable, even as root
    assert "cannot write into /sys" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    assert cli_main(["upcycle", str(damaged), str(tmp_path / "out"), "--no-report"]) == 2
    assert f"{damaged / 'config.json'} is not valid JSON" in capsys.readouterr().err


def _write_config(directory: Path, config) -> Path:
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    return directory


def _llava(text_config, **kwargs):
    return LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=text_config, image_token_index=4, **kwargs)


def test_unsupported_sources_fail_clearly(sources, tmp_path):
    llama = dict(vocab_size=40, **TEXT)
    cases = [
        (tmp_path / "missing", "neither a local directory"),
        (_write_config(tmp_path / "empty", LlamaConfig(**llama)).parent / "nothing-here", "neither a local"),
        (_write_config(tmp_path / "causal", LlamaConfig(**llama)), "cannot upcycle model_type 'llama'"),
        (_write_config(tmp_path / "video", LlavaNextVideoConfig(text_config=LlamaConfig(**llama))), "not videos"),
        (_write_config(tmp_path / "gelu", _llava(LlamaConfig(**llama, hidden_act="gelu"))), "SwiGLU"),
        (_write_config(tmp_path / "bias", _llava(LlamaConfig(**llama, mlp_bias=True))), "mlp_bias"),
        (_write_config(tmp_path / "noweights", _llava(LlamaConfig(**llama))), "no model.safetensors"),
        (_write_config(tmp_path / "mixed", _llava(Qwen2Config(**llama, use_sliding_window=True, sliding_window=8,
                                                              max_window_layers=2))), "mixes sliding-window"),
    ]
    (tmp_path / "noconfig").mkdir()
    cases.append((tmp_path / "noconfig", "has no config.json"))
    pickle_only = _write_config(tmp_path / "pickle", _llava(LlamaConfig(**llama)))
    (pickle_only / "pytorch_model.bin").write_bytes(b"")
    cases.append((pickle_only, "Convert first"))
    gemma = _llava(LlamaConfig(**llama)).to_dict()
    gemma["text_config"] = {"model_type": "gemma", **llama}
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps(gemma))
    cases.append((tmp_path / "gemma", "supports llama/mistral/qwen2/qwen3"))
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            upcycle(source, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    good = sources["llama"]["dir"]
    with pytest.raises(ValueError, match="cannot be overridden"):
        upcycle(good, tmp_path / "out", hidden_size=32)
    with pytest.raises(ValueError, match="mode="):
        upcycle(good, tmp_path / "out", mode="slice")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        upcycle(good, tmp_path / "out", moe_variant="modality", experts=(1, 1, 0, 0))
    with pytest.raises(ValueError, match="partition"):
        upcycle(good, tmp_path / "out", moe_variant="dense", mode="partition")
    with pytest.raises(ValueError, match="cannot upcycle a"):
        upcycle(AsyMoEForConditionalGeneration.from_pretrained(upcycle(good, tmp_path / "asy")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.upcycling-*"))  # failed runs clean up their temp dirs
