"""Model directories: converted sce_jax directories, training output directories, Hugging Face directories/hub ids.

A converted directory: config.json + tokenizer files + params/ (Orbax). A training output directory: config.json +
tokenizer files + checkpoints/ (Orbax CheckpointManager, item "params" per step). See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.quant import QUANTIZATION_FILE, SCHEME, is_quantized, quantized_target
from sce_jax.tokenization import TOKENIZER_FILES
from sce_jax.weights import CheckpointError, hf_to_params, param_shapes, read_hf_state_dict

PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
# What to fetch of a hub model: weights in either format, config and tokenizer.
_HUB_PATTERNS = ["config.json", "model.safetensors", "pytorch_model.bin", *TOKENIZER_FILES]


def abstract_params(config: SparseCrossEncoderConfig) -> dict:
    """Parameter tree of ShapeDtypeStructs, the restore target that also validates shapes."""
    # An explicit single-device sharding lets Orbax restore arrays that were saved split across devices.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding),
        param_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(destination) / name)


@contextlib.contextmanager
def staged_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside `path` that is renamed to `path` only if the block succeeds.

    A failure leaves neither a partial `path` nor a stray staging directory; an existing non-empty `path` is
    never touched.
    """
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_model_dir(path: str | Path, config: SparseCrossEncoderConfig, params: dict, tokenizer_dir: str | Path) -> Path:
    """Write a converted model directory atomically."""
    import orbax.checkpoint as ocp

    with staged_directory(path) as staging:
        config.to_json(staging / "config.json")
        copy_tokenizer_files(tokenizer_dir, staging)
        if is_quantized(params):
            (staging / QUANTIZATION_FILE).write_text(json.dumps(SCHEME, indent=2) + "\n")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, jax.tree.map(np.asarray, params))
    return Path(path)


def _restore_params(directory: Path, config: SparseCrossEncoderConfig) -> dict:
    import orbax.checkpoint as ocp

    target = abstract_params(config)
    if (directory / QUANTIZATION_FILE).exists():  # written by the converter's --quantize int8
        target = quantized_target(target)
    try:
        if (directory / PARAMS_DIR).exists():
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(directory / PARAMS_DIR, target)
        with ocp.CheckpointManager(directory / CHECKPOINTS_DIR) as manager:
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"{directory / CHECKPOINTS_DIR} holds no finished checkpoint")
            restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
            return restored["params"]
    except (ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: parameters do not match config.json: {e}") from None


def is_sce_dir(path: Path) -> bool:
    return (path / "config.json").exists() and ((path / PARAMS_DIR).exists() or (path / CHECKPOINTS_DIR).exists())


def fetch_hub_model(model_id: str) -> Path:
    """Download (or find in the local cache) a hub model's config, weights and tokenizer."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types (offline, 404, auth); all mean "not available"
        raise FileNotFoundError(
            f"{model_id!r} is neither a local directory nor a reachable Hugging Face hub model ({type(e).__name__}: {e})"
        ) from None


def load_model_dir(source: str | Path) -> tuple[SparseCrossEncoderConfig, dict, Path]:
    """(config, params, tokenizer directory) from a converted dir, training dir, HF dir or hub id."""
    path = Path(source)
    if not path.exists():
        if str(source).startswith((".", "/")) or str(source).count("/") != 1:
            raise FileNotFoundError(f"model {str(source)!r} not found (not a directory, not a hub id like org/name)")
        path = fetch_hub_model(str(source))
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(source)!r} is not a directory")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json")
    config = SparseCrossEncoderConfig.from_json(path / "config.json")
    if is_sce_dir(path):
        params = _restore_params(path, config)
    else:
        params = hf_to_params(read_hf_state_dict(path), config, source=str(path))
    return config, params, path

