"""Durable writes: a reader sees the old file or the whole new one, never a torn one; and what we
publish gets the mode the umask allows, whatever mode the library that wrote it chose."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_hpc.fsutil import looks_local, model_identity, seal_tree, umask_mode, write_aside


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_mode_is_read_without_changing_the_umask(umask):
    assert umask_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # still what the fixture set


def test_files_written_aside_get_the_umasks_mode_though_safetensors_makes_them_0600(tmp_path, umask):
    target = tmp_path / "a.safetensors"
    write_aside(target, lambda tmp: save_file({"x": torch.arange(3.0)}, str(tmp)))
    assert mode(target) == 0o666 & ~umask
    assert torch.equal(load_file(target)["x"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_aside(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_sealed_tree_has_every_file_at_the_umasks_mode(tmp_path, umask):
    (tmp_path / "sub").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "sub" / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    os.chmod(tmp_path / "config.json", 0o600)
    seal_tree(tmp_path)
    assert {mode(p) for p in tmp_path.rglob("*") if p.is_file()} == {0o666 & ~umask}


def test_a_filesystem_that_refuses_modes_does_not_fail_the_write(tmp_path, monkeypatch):
    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refuse)
    write_aside(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
    seal_tree(tmp_path)
    assert (tmp_path / "a.json").read_text() == "{}"


def test_a_model_is_named_by_its_folders_files_or_its_hub_name(tmp_path):
    assert model_identity("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    (tmp_path / "model.safetensors").write_bytes(b"1")
    before = model_identity(str(tmp_path))
    assert before == [("model.safetensors", 1, (tmp_path / "model.safetensors").stat().st_mtime_ns)]
    (tmp_path / "model.safetensors").write_bytes(b"22")  # retrained in place: another model
    assert model_identity(str(tmp_path)) != before


def test_hub_ids_and_paths_are_told_apart_as_the_loaders_do():
    assert not looks_local("meta-llama/Llama-3.2-1B") and not looks_local("gpt2")
    assert all(looks_local(p) for p in ("./m", "/abs/m", "~/m", "runs/sft/abc"))
    assert looks_local("pairs.JSONL", (".jsonl",)) and not looks_local("pairs.jsonl")
