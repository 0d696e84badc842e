"""Convert Hugging Face (PyTorch) checkpoints to sce_jax model directories, and export them back.

The command line lives in `convert_torch_checkpoint.py` at the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sce_jax.checkpoint import copy_tokenizer_files, load_model_dir, save_model_dir, staged_directory
from sce_jax.config import PATTERN_FLAGS, SparseCrossEncoderConfig, released_pattern
from sce_jax.quant import dequantize_params, quantize_params
from sce_jax.weights import CheckpointError, extend_position_embeddings, params_to_hf


def convert(
    source: str | Path,
    output: str | Path,
    *,
    config_overrides: dict[str, Any] | None = None,
    extend_positions: int | None = None,
    trained_positions: int | None = None,
    quantize: str | None = None,
) -> SparseCrossEncoderConfig:
    """Write an sce_jax model directory for `source` (hub id, HF directory or sce_jax directory).

    `quantize="int8"` stores the linear layers' weights as int8 with per-output-channel scales (sce_jax.quant).
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; the only one is int8")
    config, params, directory = load_model_dir(source)
    if config_overrides:
        config = config.replace(**config_overrides)
    if extend_positions is not None:
        table = np.asarray(params["embeddings"]["position_embeddings"]["embedding"])
        params["embeddings"]["position_embeddings"]["embedding"] = extend_position_embeddings(
            table, extend_positions, trained_positions
        )
        config = config.replace(max_position_embeddings=extend_positions)
    if quantize == "int8":
        params = quantize_params(params, config)
    save_model_dir(output, config, params, directory)
    return config


def export_hf(source: str | Path, output: str | Path) -> SparseCrossEncoderConfig:
    """Write a Hugging Face directory (config.json + model.safetensors with the original key names)."""
    from safetensors.numpy import save_file

    config, params, directory = load_model_dir(source)
    params = dequantize_params(params)
    with staged_directory(output) as staging:
        config.to_json(staging / "config.json")
        save_file(params_to_hf(params, config), str(staging / "model.safetensors"), metadata={"format": "pt"})
        copy_tokenizer_files(directory, staging)
    return config


def _window(value: str) -> int | None:
    if value.lower() in ("none", "full"):
        return None
    window = int(value)
    if window < 1:
        raise argparse.ArgumentTypeError("the window must be >= 1 or 'none'")
    return window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_torch_checkpoint.py",
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
    return parser.parse_args(argv)


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
    try:
        if args.export:
            config = export_hf(args.source, args.output)
        else:
            config = convert(
                args.source,
                args.output,
                config_overrides=config_overrides_from_args(args),
                extend_positions=args.extend_positions,
                trained_positions=args.trained_positions,
                quantize=args.quantize,
            )
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pattern = "full attention" if config.is_full_attention else f"window {config.attention_window_size}"
    print(f"wrote {args.output} ({config.num_hidden_layers} layers, {config.max_position_embeddings} positions, {pattern})")
    return 0
