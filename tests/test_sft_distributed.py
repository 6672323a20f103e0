"""Multi-process training on CPU (gloo): the SFT script with the project's DDP config through `accelerate launch`
(routing summed over ranks), FSDP2 `fully_shard` of AsyMoE as fsdp2.yaml wraps it (accelerate runs FSDP only on
GPUs: docs/finetuning.md), and the DeepSpeed config's leaf module."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import needs_trl_vision_masks, save_training_setup

from asymoe import AsyMoEForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configuration/accelerate"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_training_setup(tmp_path_factory.mktemp("sft_distributed"), train_size=16)


@pytest.mark.slow
@needs_trl_vision_masks
def test_ddp_two_cpu_processes(tiny):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    output = tiny / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "-m", "asymoe.finetune.sft",
               "--config", str(REPO / "configuration/recipes/sft_tiny.yaml"),
               "--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data"),
               "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "4",
               "--logging_steps", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 3 steps (MULTI_CPU, world size 2)" in result.stdout, result.stdout[-2000:]
    reloaded = AsyMoEForConditionalGeneration.from_pretrained(output)
    assert reloaded.moe_blocks()[0].experts.gate_up_proj.shape[0] == 4
    # Routing counts are summed over both ranks: 3 steps x 2 ranks x 4 rows, one image each.
    routing = json.loads((output / "routing.json").read_text())
    assert routing[0]["image"]["tokens"] == 3 * 2 * 4 * reloaded.config.num_image_tokens
    assert (output / "routing.png").is_file()


def fsdp2_wrap_policy(model):
    """accelerate's own FSDP2 auto-wrap policy, built from fsdp2.yaml."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    fsdp = yaml.safe_load((ACCELERATE / "fsdp2.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    return fsdp2_prepare_auto_wrap_policy(plugin, model)


def test_fsdp2_config(tiny):
    """fsdp2.yaml: FSDP v2 that saves a full state dict (save_model writes no weights otherwise); its wrap policy
    picks exactly the decoder layers."""
    config = yaml.safe_load((ACCELERATE / "fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    model = AsyMoEForConditionalGeneration.from_pretrained(tiny / "model")
    policy = fsdp2_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"model.language_model.layers.{i}" for i in range(model.config.text_config.num_hidden_layers)]


def _fsdp2_worker(rank: int, port: int, model_dir: str) -> None:
    """Rank `rank` of 2: shard the model as fsdp2.yaml says, train 2 AdamW steps on the same batch as an unsharded
    copy, compare the gathered weights."""
    from PIL import Image
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        reference = AsyMoEForConditionalGeneration.from_pretrained(model_dir)
        model = AsyMoEForConditionalGeneration.from_pretrained(model_dir)
        policy = fsdp2_wrap_policy(model)
        for module in [m for m in model.modules() if policy(m)]:
            fully_shard(module)
        fully_shard(model)
        experts = model.moe_blocks()[0].experts
        assert isinstance(experts.gate_up_proj, DTensor) and isinstance(experts.raw_curvature, DTensor)
        assert experts.gate_up_proj.to_local().shape[0] == experts.num_experts // 2  # sharded along the experts

        processor = AutoProcessor.from_pretrained(model_dir)
        text = "USER: <image>\nwhat color is the circle ?\nASSISTANT: red </s>"
        batch = processor(images=[Image.new("RGB", (32, 32), "red")] * 2, text=[text] * 2, return_tensors="pt")
        losses = {}
        for name, net in (("sharded", model), ("reference", reference)):
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
            for _ in range(2):
                out = net(**batch, labels=batch["input_ids"], output_router_logits=True)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            losses[name] = out.loss.item()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            assert losses["sharded"] == pytest.approx(losses["reference"], rel=1e-5)
            expected = reference.state_dict()
            assert full.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(full[key], value, atol=1e-5, rtol=1e-4, msg=key)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_cpu_processes(tiny):
    """FSDP2 on 2 CPU processes (gloo) trains as one unsharded process does: every parameter shards (no 0-d ones)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_fsdp2_worker, args=(port, str(tiny / "model")), nprocs=2)


def test_deepspeed_config_names_the_moe_block(tiny):
    """The ZeRO-3 leaf module accelerate passes to deepspeed.utils.set_z3_leaf_modules exists in the model."""
    config = yaml.safe_load((ACCELERATE / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert config["zero_stage"] == 3
    model = AsyMoEForConditionalGeneration.from_pretrained(tiny / "model")
    names = {type(module).__name__ for module in model.modules()}
    assert set(config["deepspeed_moe_layer_cls_names"].split(",")) <= names
