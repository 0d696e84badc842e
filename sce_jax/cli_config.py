"""Dataclass settings for the command-line tools: the defaults, then a YAML file, then flags.

Each field is a YAML key and a flag (`batch_size:` or `batch-size:`, `--batch-size`). Field types: bool (flags
`--x`/`--no-x`), int, float, str, list[str] (`--x A B`), and unions of them with None (flag value `none`/`null`).
Relative paths in a YAML file are relative to that file's folder; in flags, to the working directory.
"""

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping

import yaml

from sce_jax.errors import one_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _options(hint) -> tuple[tuple, bool]:
    """A type hint's non-None types (`int | None` -> (int,)) and whether it takes None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(option for option in options if option is not type(None)), type(None) in options


def _describe(hint) -> str:
    options, nullable = _options(hint)
    return " or ".join([(typing.get_origin(option) or option).__name__ for option in options] + ["null"] * nullable)


def _matches(value, option) -> bool:
    if option in (int, float):  # YAML's `1` is a fine float, its `true` is no number
        return isinstance(value, (int, option)) and not isinstance(value, bool)
    if typing.get_origin(option) is list:
        (item,) = typing.get_args(option)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, option)


def _flag_parser(hint):
    """Reads a flag's text as `hint`; argparse turns the ValueError into a usage error naming the flag."""
    options, nullable = _options(hint)
    options = sorted(options, key=lambda option: option is str)  # str last: it reads anything

    def parse(text: str):
        if nullable and text.lower() in ("none", "null"):
            return None
        for option in options:
            try:
                return option(text)
            except ValueError:
                pass
        raise ValueError(text)

    parse.__name__ = _describe(hint)  # argparse's message: "invalid int or null value: 'x'"
    return parse


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_texts: dict[str, str] | None = None) -> None:
    """A flag per field of `cls`. Flags not given stay out of the parsed namespace, so they never override YAML."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        options, _ = _options(hint)
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS,
                  "help": (help_texts or {}).get(field.name, f"default: {field.default}")}
        if options == (bool,):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(options[0]) is list:
            kwargs.update(nargs="+", type=_flag_parser(typing.get_args(options[0])[0]))
        else:
            kwargs["type"] = _flag_parser(hint)
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def read_yaml_settings(cls, path: str, error_type: type[Exception]) -> dict:
    """The YAML file's settings for `cls`, each checked against its field's type; errors (one line) name the
    file, and the line where YAML knows it. A key given twice (also as `a_b` and `a-b`) is an error."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise error_type(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM is not part of the settings
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise error_type(f"{path}: line {line}: not UTF-8 text (byte {error.start})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or one_line(error)
        raise error_type(f"{path}: {where}cannot read config: {one_line(problem)}") from None
    if loaded is None:  # an empty file
        return {}
    if not isinstance(loaded, dict):
        raise error_type(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise error_type(f"{path}: setting {name} is given twice (as {'/'.join(sorted({name, str(key)}))})")
        values[name] = value
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise error_type(f"{path}: unknown settings {', '.join(unknown)} (known: {', '.join(names)})")
    for name, value in values.items():
        options, nullable = _options(hints[name])
        if not ((value is None and nullable) or any(_matches(value, option) for option in options)):
            raise error_type(f"{path}: {name} must be {_describe(hints[name])}, got {value!r}")
    return values


# Kinds of settings that name files (the `paths` of `resolve_dataclass`). PATH: always a file or directory.
# PATH_OR_ID: a local path, or a Hugging Face hub / ir_datasets id (`org/name`, `msmarco-passage/dev`), which looks
# like a relative path: read as a path where it exists beside the config file or starts with ./ or ../.
PATH, PATH_OR_ID = "path", "path or id"


def relative_to_config(values: dict, yaml_path: str, paths: Mapping[str, str]) -> dict:
    """`values` read from `yaml_path`, with the relative paths among `paths` (field name -> PATH or PATH_OR_ID)
    joined to the config file's folder; absolute paths, `~` paths and ids stay as written."""
    base = os.path.dirname(yaml_path)
    resolved = dict(values)
    for name, kind in paths.items():
        value = values.get(name)
        if not isinstance(value, str) or not value or value.startswith("~") or os.path.isabs(value):
            continue
        candidate = os.path.join(base, value)
        if kind == PATH or value.startswith(("./", "../")) or os.path.exists(candidate):
            resolved[name] = candidate
    return resolved


def resolve_dataclass(cls, yaml_path: str | None, flag_values: dict, error_type: type[Exception],
                      paths: Mapping[str, str] | None = None):
    """`cls` from its defaults, then the YAML file's settings (if a path is given; relative paths among `paths`
    against the file's folder, see `relative_to_config`), then `flag_values` (as given)."""
    values = {}
    if yaml_path is not None:
        values = relative_to_config(read_yaml_settings(cls, yaml_path, error_type), yaml_path, paths or {})
    return cls(**{**values, **flag_values})
