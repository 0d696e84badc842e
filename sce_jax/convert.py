"""Convert Hugging Face (PyTorch) checkpoints to sce_jax model directories, and export them back.

The command: `python -m sce_jax.convert` (installed as `sce-jax-convert`; `convert_torch_checkpoint.py` at the
repository root is the same command).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sce_jax.cache import enable_compilation_cache
from sce_jax.checkpoint import (
    check_output_dir,
    copy_tokenizer_files,
    is_sce_dir,
    load_params,
    read_model_config,
    resolve_model_dir,
    save_model_dir,
    staged_directory,
)
from sce_jax.config import PATTERN_FLAGS, SparseCrossEncoderConfig, released_pattern
from sce_jax.errors import InputError, run_cli
from sce_jax.encoder import quantized_params
from sce_jax.files import current_umask, interrupts_exit_at_once
from sce_jax.quant import dequantize_params
from sce_jax.weights import (
    extend_position_embeddings,
    hf_to_params,
    is_bare_encoder,
    params_to_hf,
    read_hf_state_dict,
    with_untrained_head,
)


def convert(
    source: str | Path,
    output: str | Path,
    *,
    config_overrides: dict[str, Any] | None = None,
    extend_positions: int | None = None,
    trained_positions: int | None = None,
    add_untrained_head: bool = False,
    quantize: str | None = None,
) -> SparseCrossEncoderConfig:
    """Write an sce_jax model directory for `source` (hub id, HF directory or sce_jax directory).

    `add_untrained_head`: `source` is a bare BERT encoder (BertModel, e.g. sentence-transformers' MiniLM);
    give it a random single-logit classifier (`weights.with_untrained_head`), so that every command can be tried
    with it. Its scores mean nothing until it is fine-tuned. Everything is checked before anything is written.
    `quantize="int8"` stores the linear layers' weights as int8 in two passes with per-output-channel scales
    (sce_jax.quant).
    """
    if quantize not in (None, "int8"):
        raise InputError(f"--quantize: unknown quantization {quantize!r}; the only one is int8")
    check_output_dir(output)
    directory = resolve_model_dir(source)
    config = read_model_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    if extend_positions is not None:
        old = config.max_position_embeddings
        if extend_positions < old:
            raise InputError(f"--extend-positions {extend_positions}: the model already has {old} positions")
        if trained_positions is not None and not 2 <= trained_positions <= old:
            raise InputError(f"--trained-positions must be in [2, {old}], got {trained_positions}")
    if add_untrained_head:
        if is_sce_dir(directory):
            raise InputError(f"--add-untrained-head: {source} is an sce_jax model, it has a classifier")
        state = read_hf_state_dict(directory)
        if not is_bare_encoder(state):
            raise InputError(f"--add-untrained-head: {source} already has a classifier")
        params = hf_to_params(with_untrained_head(state, config), config, source=str(directory))
    else:
        params = load_params(directory, config)
    if extend_positions is not None:
        table = np.asarray(params["embeddings"]["position_embeddings"]["embedding"])
        params["embeddings"]["position_embeddings"]["embedding"] = extend_position_embeddings(
            table, extend_positions, trained_positions
        )
        config = config.replace(max_position_embeddings=extend_positions)
    if quantize == "int8":
        params = quantized_params(params, config)
    save_model_dir(output, config, params, directory)
    return config


def export_hf(source: str | Path, output: str | Path) -> SparseCrossEncoderConfig:
    """Write a Hugging Face directory (config.json + model.safetensors with the original key names)."""
    from safetensors.numpy import save_file

    check_output_dir(output)
    directory = resolve_model_dir(source)
    config = read_model_config(directory)
    params = load_params(directory, config)
    params = dequantize_params(params)
    with staged_directory(output) as staging:
        config.to_json(staging / "config.json")
        save_file(params_to_hf(params, config), str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(staging / "model.safetensors", 0o666 & ~current_umask())  # safetensors creates it 0600
        copy_tokenizer_files(directory, staging)
    return config


def export_notes(config: SparseCrossEncoderConfig) -> list[str]:
    """What a user of the exported directory must know (printed at export; the README says the same)."""
    notes = ["Hugging Face's BertForSequenceClassification gives sce_jax's scores only for sce_jax's input layout, "
             "[CLS] query [SEP] [SEP] document [SEP] [SEP] (token types 0 up to the query's second [SEP], then 1), "
             "not for the tokenizer's usual pair encoding [CLS] query [SEP] document [SEP]"]
    if not config.is_full_attention:
        window = config.attention_window_size
        notes.append(f"this model's attention is sparse ({'window ' + str(window) if window else 'no window'}, "
                     "sparse pattern flags): BertForSequenceClassification ignores those config.json fields and "
                     "loads it as FULL attention, with other scores; the original sparse-cross-encoder code "
                     "(ListformerModelForSequenceClassification) reads them")
    return notes


def _window(value: str) -> int | None:
    if value.lower() in ("none", "full"):
        return None
    window = int(value)
    if window < 1:
        raise argparse.ArgumentTypeError("the window must be >= 1 or 'none'")
    return window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sce-jax-convert",
        description="Convert a Hugging Face sparse/full cross-encoder (hub id or directory) into an sce_jax model "
        "directory, or export an sce_jax model back to a Hugging Face directory (--export).",
    )
    parser.add_argument("source", help="hub id (e.g. webis/sparse-cross-encoder-4-512) or local directory")
    parser.add_argument("output", help="directory to create (must not exist or be empty)")
    parser.add_argument("--export", action="store_true", help="write a Hugging Face directory instead")
    parser.add_argument("--attention-window", type=_window, default=argparse.SUPPRESS, metavar="W|none",
                        help="override the document window (none = full document attention)")
    for flag in PATTERN_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"override {flag}")
    parser.add_argument("--sparse", action="store_true",
                        help="use the released models' pattern (window 4 unless --attention-window is given)")
    parser.add_argument("--extend-positions", type=int, metavar="N",
                        help="linearly interpolate the position table to N rows (see README)")
    parser.add_argument("--quantize", choices=["int8"],
                        help="store the linear layers as int8 with per-channel scales (docs/int8.md)")
    parser.add_argument("--trained-positions", type=int, metavar="K",
                        help="with --extend-positions: only the first K rows count as trained")
    parser.add_argument("--add-untrained-head", action="store_true",
                        help="the source is a bare BERT encoder (BertModel, e.g. the packaged all-MiniLM-L6-v2): add "
                        "a RANDOM single-logit classifier so every command can be tried offline; its scores mean "
                        "nothing until the model is fine-tuned")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    if args.trained_positions is not None and args.extend_positions is None:
        parser.error("--trained-positions needs --extend-positions")
    if args.export and (args.extend_positions is not None or args.add_untrained_head
                        or config_overrides_from_args(args)):
        parser.error("--export writes the model as it is: it takes no pattern, position or head options")
    return args


def config_overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.sparse:
        overrides.update(released_pattern())
    if "attention_window" in args:
        overrides["attention_window_size"] = args.attention_window
    overrides.update({flag: getattr(args, flag) for flag in PATTERN_FLAGS if getattr(args, flag) is not None})
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Nothing is written until the output's staging directory exists, and that defers signals until its write
    # is done (then removes it): until then an interrupt ends the process at once, rather than being raised
    # inside JAX or Orbax code that cannot always stop cleanly.
    with interrupts_exit_at_once():
        if args.export:
            config = export_hf(args.source, args.output)
        else:
            config = convert(
                args.source,
                args.output,
                config_overrides=config_overrides_from_args(args),
                extend_positions=args.extend_positions,
                trained_positions=args.trained_positions,
                add_untrained_head=args.add_untrained_head,
                quantize=args.quantize,
            )
    pattern = "full attention" if config.is_full_attention else f"window {config.attention_window_size}"
    head = "; its classifier is UNTRAINED (random)" if args.add_untrained_head else ""
    print(f"wrote {args.output} ({config.num_hidden_layers} layers, {config.max_position_embeddings} positions, "
          f"{pattern}{head})")
    if args.export:
        for note in export_notes(config):
            print(f"note: {note}")
    return 0


def cli() -> None:
    """The `sce-jax-convert` console script: bad input is one line `error: ...` and exit status 2."""
    enable_compilation_cache()  # compiled programs are reused by the next run (docs/architecture.md)
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
