"""The upcycler's safetensors writer on its own: shards sized up front, tensors written whole, in parts or copied
file to file, in any order; the result is what safetensors and transformers read."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymoe.upcycling.safetensors_io import ShardWriter, TensorSpec, parse_size, read_header, read_tensor


def test_shards_written_in_any_order_read_back(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(4, 3, generator=generator),
        "b.experts": torch.randn(3, 2, 5, generator=generator).to(torch.bfloat16),
        "c.mask": torch.tensor([True, False, True]),
        "d.ids": torch.arange(7, dtype=torch.int64),
    }
    specs = {name: TensorSpec(t.dtype, tuple(t.shape), parts=3 if name == "b.experts" else 1)
             for name, t in tensors.items()}
    source = tmp_path / "source.safetensors"
    save_file({"d.ids": tensors["d.ids"]}, source)
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=64)
    assert len(writer.files) > 1  # 64-byte shards: the tensors spread over several files
    for part in (2, 0):
        writer.write("b.experts", tensors["b.experts"][part], part=part)
    assert writer.missing() == ["a.weight", "b.experts", "c.mask", "d.ids"]
    writer.write("b.experts", tensors["b.experts"][1], part=1)
    writer.write("c.mask", tensors["c.mask"])
    writer.write("a.weight", tensors["a.weight"])
    header, _ = read_header(source)
    fd = os.open(source, os.O_RDONLY)
    try:
        start, end = header["d.ids"]["data_offsets"]
        writer.copy_bytes("d.ids", fd, header["d.ids"]["start"], end - start)
        assert torch.equal(read_tensor(fd, header["d.ids"]), tensors["d.ids"])
    finally:
        os.close(fd)
    assert writer.missing() == []
    index = writer.close()
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for file_name in writer.files:
        loaded.update(load_file(tmp_path / file_name))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_writes_that_do_not_fit_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, {"x": TensorSpec(torch.float32, (2, 3), parts=2)}, max_shard_bytes=1 << 20)
    with pytest.raises(KeyError, match="not a tensor"):
        writer.write("y", torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected \(3,\) torch.float32"):
        writer.write("x", torch.zeros(2, 3), part=0)
    with pytest.raises(IndexError, match="out of range"):
        writer.write("x", torch.zeros(3), part=2)
    writer.abort()


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("5GB", 5 * 10**9), ("2MiB", 2 * 1024**2), ("1.5kB", 1500)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected
