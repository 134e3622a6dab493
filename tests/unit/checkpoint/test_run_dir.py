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


def test_the_manifest_names_the_source_edits_environment_and_container(tmp_path, monkeypatch):
    import subprocess

    from dpo_hpc.checkpoint import provenance

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    clean = provenance.git_state(repo)
    assert len(clean["git_sha"]) == 40 and clean["git_dirty"] is False and clean["git_diff_sha256"] is None
    (repo / "a.py").write_text("x = 2\n")
    edited = provenance.git_state(repo)
    (repo / "a.py").write_text("x = 3\n")
    other = provenance.git_state(repo)
    assert edited["git_dirty"] and other["git_dirty"] and edited["git_diff_sha256"] != other["git_diff_sha256"]
    assert provenance.git_state(tmp_path / "elsewhere") == {"git_sha": None, "git_dirty": None,
                                                           "git_diff_sha256": None}  # not a checkout

    env = provenance.environment()
    assert env["packages"] > 10 and len(env["sha256"]) == 16 and env == provenance.environment()
    image = tmp_path / "dpo-hpc.sif"
    image.write_bytes(b"x" * 100)
    found = provenance.container({"APPTAINER_CONTAINER": str(image)})
    assert found["runtime"] == "apptainer" and found["image"] == str(image) and found["size"] == 100
    assert provenance.container({"SINGULARITY_CONTAINER": "/gone.sif"}) == {"runtime": "apptainer",
                                                                            "image": "/gone.sif"}


def test_a_started_run_records_its_provenance(tmp_path):
    from dpo_hpc.checkpoint import RunDir
    from dpo_hpc.config import validate_mapping

    cfg = validate_mapping({"policy_name": "m", "dataset": {"dataset_name": "d"},
                            "dpo_training": {"learning_rate": 1e-3, "batch_size": 2, "save_dir": str(tmp_path)}}, "dpo")
    manifest = RunDir(tmp_path).start(cfg, "dpo", world_size=1)
    assert {"git_sha", "git_dirty", "git_diff_sha256", "libraries", "environment", "container"} <= set(manifest)
    assert "torch" in manifest["libraries"] and manifest["environment"]["packages"] > 10
    assert json.loads((tmp_path / MANIFEST).read_text())["environment"] == manifest["environment"]


def test_a_folder_holding_another_runs_record_names_it(tmp_path):
    from dpo_hpc.checkpoint import RunDir

    run = RunDir(tmp_path)
    assert run.other_run("eval-1") is None  # nothing recorded
    (tmp_path / MANIFEST).write_text(json.dumps({"status": "completed"}))
    assert run.other_run("eval-1") is None  # records no id: made before ids were recorded
    (tmp_path / MANIFEST).write_text(json.dumps({"status": "completed", "run_id": "eval-1"}))
    assert run.other_run("eval-1") is None and run.other_run("eval-2") == "eval-1"
