"""PEFT LoRA on AsyMoE: what the recipe targets, that only adapters train, and that adapters saved, reloaded and
merged (`asymoe merge-lora`) give the same logits, the merged checkpoint loading with remote code."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_image
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

from asymoe import AsyMoEForConditionalGeneration
from asymoe.finetune.lora import lora_config, make_parser, merge_lora, quantization_config
from asymoe.finetune.lora import main as merge_main
from asymoe.tiny import tiny_config, tiny_processor

PROMPT = "USER: <image>\nwhat color is the circle ?\nASSISTANT: red </s>"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A saved tiny AsyMoE with its processor."""
    directory = tmp_path_factory.mktemp("lora") / "base"
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    AsyMoEForConditionalGeneration(config).save_pretrained(directory)
    tiny_processor(config, tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def batch(tokenizer, processor):
    inputs = processor(images=[make_image(0), make_image(1)], text=[PROMPT, PROMPT], return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def wrapped_names(peft_model) -> set[str]:
    """Module names PEFT put LoRA on, and parameter names it targets (module.param)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names = set()
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            names.add(f"{name.replace('.base_layer', '')}.{module.parameter_name}")  # nested wrappers
        elif isinstance(module, LoraLayer):
            names.add(name)
    return names


def test_config_targets_language_attention_experts_and_evidence(make_model):
    model = make_model()
    names = wrapped_names(get_peft_model(model, lora_config(model, rank=2)))
    layer = "model.language_model.layers"
    attention = {f"{layer}.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    experts = {f"{layer}.{i}.mlp.experts.{p}" for i in (1, 3) for p in ("gate_up_proj", "down_proj")}
    evidence = {f"{layer}.3.mlp.evidence.{p}" for p in ("q_proj", "o_proj")}
    assert names == attention | experts | evidence  # no router, vision tower, projector or LM head

    dense_mlp = lora_config(model, "mlp+experts", train_routers=True, evidence="full")
    names = wrapped_names(get_peft_model(make_model(), dense_mlp))
    assert names == {f"{layer}.{i}.mlp.{p}" for i in (0, 2) for p in ("gate_proj", "up_proj", "down_proj")} | experts
    assert dense_mlp.modules_to_save == ["router", "evidence"]


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": "attention+all"}, "unknown LoRA targets"),
    ({"dropout": 0.05}, "set the dropout to 0"),
    ({"evidence": "half"}, "unknown evidence mode"),
])
def test_config_rejects_bad_input(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_config(make_model(), **kwargs)


def test_config_on_a_dense_model(make_model):
    dense = make_model("dense")
    with pytest.raises(ValueError, match="no MoE layers"):
        lora_config(dense)
    assert lora_config(dense, "attention+mlp", dropout=0.1).target_parameters is None


def test_only_adapters_train(make_model, batch):
    model = get_peft_model(make_model(), lora_config(make_model(), rank=4, train_routers=True))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert any(".router.modules_to_save." in name for name in trainable)
    assert any(".evidence.gate.modules_to_save." in name for name in trainable)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        output = model(**batch, output_router_logits=True)
        output.loss.backward()
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
        optimizer.step()
    # By the third step every adapter has a gradient (LoRA A and the evidence readout start at zero gradient: their
    # B and the readout's W_o start at zero).
    assert [n for n in sorted(trainable) if not model.get_parameter(n).grad.abs().sum() > 0] == []

    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == trainable


@pytest.fixture(scope="module")
def adapter(base_dir, batch, tmp_path_factory):
    """An adapter on experts + attention, trained a few steps on `batch` and saved."""
    model = AsyMoEForConditionalGeneration.from_pretrained(base_dir)
    model = get_peft_model(model, lora_config(model, rank=4, train_routers=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(directory)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return directory, logits


def logits_of(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_saved_adapter_reloads(base_dir, adapter, batch):
    directory, trained_logits = adapter
    base = AsyMoEForConditionalGeneration.from_pretrained(base_dir)
    base_logits = logits_of(base, batch)
    reloaded = PeftModel.from_pretrained(base, directory)
    torch.testing.assert_close(logits_of(reloaded, batch), trained_logits, atol=1e-5, rtol=1e-5)
    assert (trained_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model


def test_merged_checkpoint_equals_base_plus_adapter(base_dir, adapter, batch, tmp_path):
    directory, trained_logits = adapter
    assert merge_main(make_parser().parse_args([str(base_dir), str(directory), str(tmp_path / "merged")])) == 0

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    torch.testing.assert_close(logits_of(merged, batch), trained_logits, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "processor_config.json").is_file()

    # Where asymoe is not imported, the checkpoint's own remote code gives the same logits.
    torch.save({"batch": dict(batch), "logits": trained_logits}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        "model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert 'asymoe' not in sys.modules and type(model).__module__.startswith('transformers_modules')\n"
        "expected = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    logits = model(**expected['batch']).logits\n"
        "torch.testing.assert_close(logits, expected['logits'], atol=1e-5, rtol=1e-5)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "merged"), str(tmp_path / "expected.pt")],
                   check=True, env=env, cwd=tmp_path)


def test_merge_errors_name_the_problem(base_dir, adapter, tmp_path, capsys):
    directory, _ = adapter
    args = argparse.Namespace(base=str(base_dir), adapter=str(base_dir), output=str(tmp_path / "out"), dtype="auto")
    assert merge_main(args) == 2
    assert "holds no PEFT adapter" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_lora(base_dir, directory, tmp_path / "taken")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is what is tested")
def test_qlora_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        quantization_config()
