"""Settings from dataclass defaults, then a YAML file, then flags (the part both CLIs share)."""

import argparse
import dataclasses
import os
import re
from pathlib import Path

import pytest

from sce_jax.cli_config import add_dataclass_flags, resolve_dataclass


class SettingsError(Exception):
    pass


@dataclasses.dataclass
class Settings:
    steps: int = 10
    rate: float = 0.5
    window: int | str | None = None
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    verbose: bool = False
    run_tag: str = "x"


def resolve(tmp_path, yaml_text: str | None, argv: list[str]) -> Settings:
    path = None
    if yaml_text is not None:
        path = tmp_path / "settings.yaml"
        path.write_text(yaml_text)
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Settings)
    return resolve_dataclass(Settings, path and str(path), vars(parser.parse_args(argv)), SettingsError)


def test_defaults_then_yaml_then_flags(tmp_path):
    assert resolve(tmp_path, None, []) == Settings()
    settings = resolve(tmp_path, "steps: 3\nrate: 1\nwindow: 4\nnames: [b, c]\nverbose: true\nrun_tag: y\n",
                       ["--steps", "7", "--window", "full", "--no-verbose"])
    assert settings == Settings(steps=7, rate=1, window="full", names=["b", "c"], verbose=False, run_tag="y")
    assert resolve(tmp_path, "window: 4\n", ["--window", "null", "--names", "d", "e", "--rate", "2e-3"]) == Settings(
        window=None, names=["d", "e"], rate=2e-3)


def test_hyphenated_yaml_keys_and_empty_file(tmp_path):
    assert resolve(tmp_path, "run-tag: y\n", []).run_tag == "y"
    assert resolve(tmp_path, "", []) == Settings()
    assert resolve(tmp_path, "steps: 2\n# only a comment\n", []).steps == 2


@pytest.mark.parametrize("yaml_text, message", [
    ("stepz: 3\n", "settings.yaml: unknown settings stepz"),
    ("steps: 1.5\n", "settings.yaml: steps must be int, got 1.5"),
    ("steps: true\n", "settings.yaml: steps must be int, got True"),
    ("rate: 7e-6\n", "settings.yaml: rate must be float, got '7e-6'"),  # YAML 1.1 reads 7e-6 as a string
    ("window: [1]\n", "settings.yaml: window must be int or str or null, got [1]"),
    ("names: [a, 1]\n", "settings.yaml: names must be list, got ['a', 1]"),
    ("run_tag: null\n", "settings.yaml: run_tag must be str, got None"),
    ("[steps]\n", "settings.yaml: expected a mapping of settings, got list"),
    ("steps: [\n", "cannot read config"),
    ("steps: 1\nrate: 2\nsteps: 3\n", "settings.yaml: line 3: cannot read config: duplicate key 'steps' (first given on line 1)"),
    ("run_tag: a\nrun-tag: b\n", "settings.yaml: setting run_tag is given twice (as run-tag/run_tag)"),
])
def test_bad_yaml_raises_the_given_error_naming_the_file(tmp_path, yaml_text, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve(tmp_path, yaml_text, [])


def test_non_utf8_yaml_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_bytes(b"steps: 3\nrun_tag: caf\xe9\n")
    with pytest.raises(SettingsError) as info:
        resolve_dataclass(Settings, str(path), {}, SettingsError)
    assert str(info.value) == f"{path}: line 2: not UTF-8 text (byte 21)"
    path.write_bytes("\ufeffsteps: 3\n".encode())  # a byte-order mark is not part of the first key
    assert resolve_dataclass(Settings, str(path), {}, SettingsError).steps == 3


def test_bad_flag_value_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        resolve(tmp_path, None, ["--steps", "many"])
    assert exit_info.value.code == 2
    assert "argument --steps: invalid int value: 'many'" in capsys.readouterr().err


@dataclasses.dataclass
class PathSettings:
    output: str | None = None
    model: str = "org/name"
    data: str | None = None


def test_relative_paths_in_a_config_file_are_relative_to_that_file_and_flags_to_the_working_dir(tmp_path, monkeypatch):
    from sce_jax.cli_config import PATH, PATH_OR_ID

    configs = tmp_path / "configs"
    (configs / "models" / "local").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a working directory that is neither the file's nor its parent
    config = configs / "settings.yaml"
    paths = {"output": PATH, "model": PATH_OR_ID, "data": PATH_OR_ID}

    def settings(yaml_text, flags=None):
        config.write_text(yaml_text)
        return resolve_dataclass(PathSettings, "../configs/settings.yaml", flags or {}, SettingsError, paths)

    got = settings("output: out/run.txt\nmodel: models/local\ndata: ../data/train.jsonl\n")
    assert got.output == os.path.join("../configs", "out/run.txt")  # PATH: always beside the file
    assert os.path.samefile(got.model, configs / "models" / "local")  # exists beside the file
    assert got.data == os.path.join("../configs", "../data/train.jsonl")  # ./ or ../: a path even if missing
    # Ids (hub, ir_datasets), absolute and ~ paths stay as written.
    got = settings(f"model: org/name\ndata: msmarco-passage/train/kd-docpairs\noutput: {tmp_path}/x\n")
    assert (got.model, got.data, got.output) == ("org/name", "msmarco-passage/train/kd-docpairs", f"{tmp_path}/x")
    assert settings("output: ~/x\n").output == "~/x"
    # Flags are relative to the working directory, as given.
    assert settings("output: a\n", {"output": "b", "model": "models/local"}) == PathSettings("b", "models/local")


def test_shipped_configs_work_from_any_directory_and_comment_every_attention_change(tmp_path, monkeypatch):
    from sce_jax import rerank, train

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    tiny = train.resolve_config(train.build_parser().parse_args(["--config", str(repo / "configs/train-tiny.yaml")]))
    assert Path(tiny.train_data).is_file() and tiny.output_dir == "runs/train"  # the default, in the working dir
    assert tiny.model_overrides["attention_window_size"] == 4  # the released models' window
    assert rerank.load_config(str(repo / "configs/rerank.yaml"), {"run": "r", "output": "o"}).model == (
        "webis/sparse-cross-encoder-4-512")  # a hub id stays one
    for config in sorted((repo / "configs").glob("*.yaml")):
        for line in config.read_text().splitlines():
            if line.split(":")[0].strip() in ("attention_window", "attention_pattern", "attention_window_size"):
                assert "#" in line, f"{config.name}: {line!r} changes the attention pattern without saying so"
