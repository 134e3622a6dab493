"""Which local folders can be loaded as a model or a tokenizer, and what is said when one cannot:
a run's directory before its run completed is the common case (a DPO config pointing at an SFT
run that failed or is still training)."""

from __future__ import annotations

import json

from dpo_hpc.checkpoint.run_dir import MANIFEST, SAVED_MODEL_FILES, TOKENIZER_FILES, not_loadable


def test_a_folder_holding_a_model_or_an_adapter_is_loadable(tmp_path):
    for file in SAVED_MODEL_FILES:
        folder = tmp_path / file
        folder.mkdir()
        (folder / file).write_text("{}")
        assert not_loadable(str(folder), "model", SAVED_MODEL_FILES) is None


def test_names_that_are_not_local_folders_are_left_to_the_loader(tmp_path):
    assert not_loadable("meta-llama/Llama-3.2-1B", "model", SAVED_MODEL_FILES) is None
    assert not_loadable(str(tmp_path / "missing"), "model", SAVED_MODEL_FILES) is None  # model_not_found says it


def test_an_unfinished_run_directory_is_named_as_one(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"trainer": "sft", "status": "failed"}))
    problem = not_loadable(str(tmp_path), "tokenizer", TOKENIZER_FILES)
    assert problem == (f"tokenizer '{tmp_path}' is the directory of a sft run that has not finished (status "
                       "'failed'): its model is written there when the run completes; finish that run first")


def test_any_other_folder_names_the_files_it_lacks(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    assert not_loadable(str(tmp_path), "model", SAVED_MODEL_FILES) == (
        f"model '{tmp_path}' is a folder without config.json or adapter_config.json (not a saved model)")
    (tmp_path / MANIFEST).write_text(json.dumps({"trainer": "dpo", "status": "completed"}))  # completed, model gone
    assert "is a folder without config.json" in not_loadable(str(tmp_path), "model", SAVED_MODEL_FILES)
