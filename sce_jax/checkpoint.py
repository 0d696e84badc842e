"""Model directories: converted sce_jax directories, training output directories, Hugging Face directories/hub ids.

A converted directory: config.json + tokenizer files + params/ (Orbax). A training output directory: config.json +
tokenizer files + checkpoints/ (Orbax CheckpointManager, item "params" per step). See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.errors import InputError, one_line, user_path
from sce_jax.files import (
    current_umask,
    deferred_signals,
    drop_orphaned_future_errors,
    is_write_error,
    locked_temporary,
    remove_stale_temporaries,
    write_error,
)
from sce_jax.quant import QUANTIZATION_FILE, SCHEME, int8_params_problem, is_quantized, quantized_target
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
            shutil.copyfile(Path(source) / name, Path(destination) / name)  # new files: modes from the umask


def check_output_dir(path: str | os.PathLike) -> Path:
    """`path` (made absolute) if a model directory can be written there, else an InputError; writes nothing.

    It must not be a file or a non-empty directory, and its nearest existing parent must be a writable directory.
    """
    path = user_path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise InputError(f"output {path} exists and is not a directory")
        if any(path.iterdir()):
            raise InputError(f"output {path} exists and is not empty")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def staged_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside `path` that is renamed to `path` only if the block succeeds.

    A failure leaves neither a partial `path` nor a stray staging directory (nor parents it created); an
    existing non-empty `path` is never touched. The directory gets the mode the umask gives (mkdtemp's is 0700).
    SIGINT/SIGTERM wait for the block to finish its write (Orbax writes from background threads), then remove
    the staging directory and raise `Interrupted` saying so; a full disk is one InputError line. The staging
    directory (`.NAME.XXXXXXXX.partial`) is locked while in use, so a later run removes one that a killed process
    left (`files.remove_stale_temporaries`).
    """
    path = check_output_dir(path)
    created = [parent for parent in reversed(path.parents) if not parent.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, staging = locked_temporary(path, directory=True)
    except OSError as e:
        _remove_created(created)
        raise InputError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        with deferred_signals() as signals:
            os.chmod(staging, 0o777 & ~current_umask())
            yield staging
            signals.check(f"{path} was not written (its partial directory was removed)")
            if path.exists():
                path.rmdir()
            os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        if is_write_error(error):
            drop_orphaned_future_errors()
            raise InputError(f"{write_error(path, error)} (nothing was left behind)") from None
        raise
    finally:
        os.close(fd)


def _remove_created(directories: list[Path]) -> None:
    for directory in reversed(directories):  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def _quiet_orbax_errors() -> Iterator[None]:
    """Orbax logs each failure of its background writer threads with a traceback (through absl) before raising
    it: those logs are dropped here; the error itself still reaches the caller."""
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def save_model_dir(path: str | Path, config: SparseCrossEncoderConfig, params: dict, tokenizer_dir: str | Path) -> Path:
    """Write a converted model directory atomically."""
    import orbax.checkpoint as ocp

    with staged_directory(path) as staging:
        config.to_json(staging / "config.json")
        copy_tokenizer_files(tokenizer_dir, staging)
        if is_quantized(params):
            (staging / QUANTIZATION_FILE).write_text(json.dumps(SCHEME, indent=2) + "\n")
        with _quiet_orbax_errors(), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, jax.tree.map(np.asarray, params))
    return user_path(path)


def _names_and_shapes(tree) -> dict[str, tuple]:
    """{"layers.0.qkv.kernel": shape} for a tree of shapes, arrays or Orbax array metadata."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple) or hasattr(x, "shape"))
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(getattr(leaf, "shape", leaf))
        for path, leaf in leaves
    }


def _verify_item(item: Path) -> None:
    """Read an Orbax item directory's metadata files and every stored byte once, in this thread: a truncated or
    corrupt file becomes one CheckpointError line here, rather than Orbax's parallel restore failing with many
    tracebacks from its worker threads (and absl log lines)."""
    for name in ("_CHECKPOINT_METADATA", "_METADATA"):
        if (item / name).exists():
            try:
                json.loads((item / name).read_bytes())
            except ValueError as e:
                raise CheckpointError(f"{item / name}: not valid JSON ({one_line(e, 120)}); is it truncated?") from None
    if not (item / "manifest.ocdbt").exists():
        return
    import tensorstore as ts

    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": item.as_uri() + "/"}).result()
        reads = [store.read(key) for key in store.list().result()]
        for read in reads:
            read.result()
    except Exception as e:  # TensorStore reports DATA_LOSS / OUT_OF_RANGE as ValueError, others as other types
        raise CheckpointError(f"{item}: cannot read the parameters ({one_line(e)}); "
                              "is the checkpoint truncated or corrupt?") from None


def _check_stored_shapes(stored, target, where: Path) -> None:
    """A one-line CheckpointError if the stored parameter tree differs from the restore target's (the config's,
    in int8 form for a quantized directory)."""
    expected = _names_and_shapes(target)
    found = _names_and_shapes(stored)
    if not found:
        raise CheckpointError(f"{where}: no parameters found in the checkpoint's metadata; is it truncated?")
    differing = [f"{name} stored {found.get(name)} expected {expected.get(name)}"
                 for name in sorted(set(expected) | set(found)) if found.get(name) != expected.get(name)]
    if differing:
        raise CheckpointError(f"{where}: parameters do not match config.json: {len(differing)} tensors differ, "
                              f"first: {differing[0]}")


def _check_scheme(path: Path) -> None:
    """A one-line CheckpointError unless the int8 directory's quantization.json names this version's scheme
    (`sce_jax.quant.SCHEME`; earlier versions stored one pass of int8 weights)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({one_line(e, 120)})") from None
    if not isinstance(stored, dict) or stored.get("weights") != SCHEME["weights"]:
        weights = stored.get("weights") if isinstance(stored, dict) else None
        raise CheckpointError(f"{path}: int8 weights stored as {weights!r}, this version reads "
                              f"{SCHEME['weights']!r}; convert the float32 model again with --quantize int8")


def _check_int8_marker(directory: Path, stored) -> None:
    """A one-line CheckpointError where quantization.json and the stored weights disagree (int8 weights without the
    file, or float32 weights with it), rather than a list of tensors whose shapes differ."""
    marker = directory / QUANTIZATION_FILE
    names = _names_and_shapes(stored)
    int8 = any(name.endswith(".residual") for name in names)
    if int8 and not marker.exists():
        raise CheckpointError(f"{directory / PARAMS_DIR} holds int8 weights, but {marker}, which marks an int8 "
                              "directory, is missing: restore it, or convert the model again")
    if marker.exists() and names and not int8:
        raise CheckpointError(f"{marker} marks an int8 directory, but {directory / PARAMS_DIR} holds float32 "
                              "weights: remove the file, or convert the model again")


def _restore_params(directory: Path, config: SparseCrossEncoderConfig) -> dict:
    import orbax.checkpoint as ocp

    target = abstract_params(config)
    where = directory / PARAMS_DIR
    if (directory / QUANTIZATION_FILE).exists():  # written by the converter's --quantize int8
        _check_scheme(directory / QUANTIZATION_FILE)
        target = quantized_target(target)
    try:
        if where.exists():
            _verify_item(where)
            with ocp.StandardCheckpointer() as checkpointer:
                stored = checkpointer.metadata(where).item_metadata
                _check_int8_marker(directory, stored)
                _check_stored_shapes(stored, target, where)
                params = checkpointer.restore(where, target)
            problem = int8_params_problem(params) if is_quantized(params) else None
            if problem:
                raise CheckpointError(f"{where}: {problem}; the int8 weights are damaged: convert the float32 model "
                                      "again with --quantize int8")
            return params
        with ocp.CheckpointManager(directory / CHECKPOINTS_DIR) as manager:
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"{directory / CHECKPOINTS_DIR} holds no finished checkpoint")
            where = directory / CHECKPOINTS_DIR / str(step)
            if (where / "params").is_dir():  # the item's own metadata: compare shapes before restoring
                _verify_item(where / "params")
                # The item's handler reads its tree metadata; a Checkpointer would also look for step metadata,
                # which the manager keeps one level up (absl warns "Metadata file does not exist" on every load).
                handler = ocp.StandardCheckpointHandler()
                try:
                    _check_stored_shapes(handler.metadata(where / "params"), target, where)
                finally:
                    handler.close()
            restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
            return restored["params"]
    except CheckpointError:
        raise
    except Exception as e:  # Orbax/TensorStore raise many types for truncated or corrupt shards
        raise CheckpointError(f"{where}: cannot read the parameters ({one_line(e)}); "
                              "is the checkpoint truncated or corrupt?") from None


def is_sce_dir(path: Path) -> bool:
    return (path / "config.json").exists() and ((path / PARAMS_DIR).exists() or (path / CHECKPOINTS_DIR).exists())


def offline_hint() -> str:
    """What to do when a hub model cannot be fetched: a local directory in its place, or the local hub cache (where
    HF_HUB_OFFLINE is set, only that was tried)."""
    from huggingface_hub import constants

    local = ("pass a local model directory in its place (make one with `python -m sce_jax.convert`, see the README's "
             "offline route)")
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched and it is not there; {local}"
    return f"to work offline, {local}, or set HF_HUB_OFFLINE=1 to use models already in the Hugging Face cache"


def fetch_hub_model(model_id: str) -> Path:
    """Download (or find in the local cache) a hub model's config, weights and tokenizer."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types (offline, 404, auth); all mean "not available"
        raise InputError(
            f"model {model_id!r} is neither a local directory nor a reachable Hugging Face hub model "
            f"({type(e).__name__}: {one_line(e, 160)}); {offline_hint()}"
        ) from None


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and "\\" not in source


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """The local directory of a model: `source` itself (relative to the working directory, `~` expanded), or for
    a hub id (org/name) that is not a local path, its downloaded or cached snapshot."""
    text = os.fspath(source)
    path = user_path(text)
    if not path.exists():
        if not _looks_like_hub_id(text):
            raise InputError(f"model {text!r} not found (not a directory, not a hub id like org/name)")
        path = fetch_hub_model(text)
    if not path.is_dir():
        raise InputError(f"model {text!r} is not a directory")
    if not (path / "config.json").exists():
        raise InputError(f"model {text!r}: {path} has no config.json")
    return path


def read_model_config(directory: Path) -> SparseCrossEncoderConfig:
    return SparseCrossEncoderConfig.from_json(directory / "config.json")


def load_params(directory: Path, config: SparseCrossEncoderConfig) -> dict:
    """The parameters of the model in `directory` (sce_jax params/ or checkpoints/, or HF weights)."""
    if is_sce_dir(directory):
        return _restore_params(directory, config)
    return hf_to_params(read_hf_state_dict(directory), config, source=str(directory))


def load_model_dir(source: str | Path) -> tuple[SparseCrossEncoderConfig, dict, Path]:
    """(config, params, tokenizer directory) from a converted dir, training dir, HF dir or hub id.

    Every problem (not found, bad config.json, unreadable or mismatched weights) is an InputError.
    """
    directory = resolve_model_dir(source)
    config = read_model_config(directory)
    return config, load_params(directory, config), directory
