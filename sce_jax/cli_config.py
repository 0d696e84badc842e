"""Dataclass settings for the command-line tools: the defaults, then a YAML file, then flags.

Each field is a YAML key and a flag (`batch_size:` or `batch-size:`, `--batch-size`). Field types: bool (flags
`--x`/`--no-x`), int, float, str, list[str] (`--x A B`), and unions of them with None (flag value `none`/`null`).
"""

import argparse
import dataclasses
import types
import typing

import yaml


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
    """The YAML file's settings for `cls`, each checked against its field's type; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise error_type(f"cannot read config {path}: {error}") from None
    if loaded is None:  # an empty file
        return {}
    if not isinstance(loaded, dict):
        raise error_type(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in loaded.items()}
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


def resolve_dataclass(cls, yaml_path: str | None, flag_values: dict, error_type: type[Exception]):
    """`cls` from its defaults, then the YAML file's settings (if a path is given), then `flag_values`."""
    values = read_yaml_settings(cls, yaml_path, error_type) if yaml_path is not None else {}
    return cls(**{**values, **flag_values})
