"""Atomic writes: published whole or not at all, leftovers of interrupted writes dealt with, and what they write
readable by other users (the modes `save_pretrained` gives, not tempfile's owner-only ones)."""

from __future__ import annotations

import os
import stat

import pytest

from asymoe import AsyMoEForConditionalGeneration
from asymoe.io import atomic_directory, atomic_write_text
from asymoe.tiny import build_tokenizer, tiny_config, tiny_llava, tiny_processor
from asymoe.upcycling import upcycle


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_directory_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as temporary:
            (temporary / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_directory(target) as temporary:
        (temporary / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as temporary:
        (temporary / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_checkpoints_are_readable_by_other_users(tmp_path, umask_022):
    """What this project writes gets 0644 / 0755 under umask 022, as transformers gives its own config.json: before,
    remote-code files were 0600 and upcycled directories 0700, so `AutoConfig.from_pretrained(dir,
    trust_remote_code=True)` raised PermissionError for any other user. (Weights that save_pretrained writes
    through safetensors are its own business.)"""
    tokenizer = build_tokenizer("what color red".split())
    config = tiny_config(tokenizer)
    saved = tmp_path / "saved"
    AsyMoEForConditionalGeneration(config).save_pretrained(saved)
    tiny_processor(config, tokenizer).save_pretrained(saved)
    assert stat.S_IMODE((saved / "config.json").stat().st_mode) == 0o644
    for name in ("configuration_asymoe.py", "modeling_asymoe.py", "hyperbolic_asymoe.py", "processing_asymoe.py"):
        assert stat.S_IMODE((saved / name).stat().st_mode) == 0o644, name
    dense, processor = tiny_llava(tokenizer)
    dense.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    upcycled = upcycle(tmp_path / "dense", tmp_path / "upcycled")
    results = atomic_write_text(tmp_path / "results" / "results.json", "{}")
    for directory in (upcycled, results.parent):
        for path in [directory, *directory.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (str(path.relative_to(tmp_path)), oct(mode))
