"""Bad and hostile files given to the commands end in one line each (exit 2), never a traceback,
a hang or a flood: binary or huge files, a folder, YAML alias bombs, thousands of problems,
line breaks smuggled into sbatch options, an output root that is a file."""

from __future__ import annotations

import pytest
import yaml

from dpo_hpc.cli import main

TRAINER = {"policy_name": "m", "dataset": {"dataset_name": "d"},
           "dpo_training": {"learning_rate": 1.0, "batch_size": 1, "save_dir": "r"}}

EXPERIMENT = """
[experiment]
name = "x"
output_root = "OUT"
SLURM
[stages.sft]
trainer = "sft"
config = { policy_name = "m", dataset = { dataset_name = "d" }, sft_training = { learning_rate = 1.0, batch_size = 1 } }
"""


def error_lines(capsys, argv: list[str], code: int = 2) -> list[str]:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    return lines


def test_binary_text_a_folder_and_a_huge_file_are_each_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary\x00")
    (tmp_path / "folder.yaml").mkdir()
    with open(tmp_path / "huge.yaml", "wb") as f:
        f.truncate(50 * 2**20)
    for name, expected in [("bin.yaml", "not UTF-8 text (byte 0xff at offset 0)"),
                           ("folder.yaml", "is a folder; expected a TOML, YAML or JSON config file"),
                           ("huge.yaml", "larger than 4 MiB"),
                           ("missing.yaml", "config file not found")]:
        (line,) = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / name)])
        assert f"{tmp_path / name}: " in line and expected in line, line


def test_yaml_alias_bombs_and_self_references_are_refused_at_once(tmp_path, capsys):
    bomb = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]  # 9^9 values
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb))
    (line,) = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / "bomb.yaml")])
    assert "more than 100,000 values once its YAML aliases (*name) are expanded" in line
    (tmp_path / "loop.yaml").write_text("a: &a\n  b: *a\n")
    (line,) = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / "loop.yaml")])
    assert "a YAML alias refers to a node that contains it" in line


@pytest.mark.parametrize("name, text", [
    ("deep.yaml", "a: " + "[" * 3000 + "]" * 3000),
    ("deep.toml", "a = " + "[" * 3000 + "]" * 3000),
    ("deep.json", '{"a": ' + "[" * 100000 + "]" * 100000 + "}"),
])
def test_nesting_too_deep_for_the_parsers_is_one_line(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    (line,) = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / name)])
    assert line.endswith("nested too deeply to be a config"), line


def test_thousands_of_problems_print_twenty_lines_and_a_count(tmp_path, capsys):
    flood = {**TRAINER, "dpo_training": {**TRAINER["dpo_training"], **{f"key{i}": i for i in range(500)}}}
    (tmp_path / "flood.yaml").write_text(yaml.safe_dump(flood))
    lines = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / "flood.yaml")])
    assert len(lines) == 21 and "unknown key" in lines[0] and lines[-1] == "error: ... and 480 more problem(s)"


def test_an_override_without_a_key_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TRAINER))
    (line,) = error_lines(capsys, ["train", "dpo", "--config", str(tmp_path / "c.yaml"), "--set", "=3"])
    assert line == "error: --set =3: expected KEY.PATH=VALUE"


@pytest.mark.parametrize("slurm, expected", [
    ('[slurm]\npartition = "gpu\\n#SBATCH --wrap=evil"', "slurm.partition: 'gpu\\n#SBATCH --wrap=evil' holds a line break"),
    ('[slurm]\nsbatch = { mail-type = "END\\rx" }', "slurm.sbatch: 'END\\rx' holds a line break or control character"),
    ('[slurm]\nsbatch = { "--mail-type" = "END" }', "'--mail-type' is not an sbatch long option name"),
    ('[slurm]\nenv = { "A B" = "1" }', "slurm.env: 'A B' is not an environment variable name"),
])
def test_sbatch_values_cannot_smuggle_in_lines_of_their_own(tmp_path, capsys, slurm, expected):
    (tmp_path / "x.toml").write_text(EXPERIMENT.replace("SLURM", slurm).replace("OUT", "out"))
    (line,) = error_lines(capsys, ["submit", str(tmp_path / "x.toml"), "--dry-run", "--no-preflight"])
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_an_output_root_that_is_a_file_is_one_line_for_every_command(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "x.toml").write_text(EXPERIMENT.replace("SLURM", "").replace("OUT", str(tmp_path / "taken")))
    for command in (["submit", "--local", "--no-preflight"], ["status"], ["report"]):
        (line,) = error_lines(capsys, [command[0], str(tmp_path / "x.toml"), *command[1:]])
        assert f"experiment.output_root: {tmp_path / 'taken'} is a file, not a folder" in line, line
    assert (tmp_path / "taken").read_text() == "a file"
