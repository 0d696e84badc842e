"""Hugging Face BERT state dicts <-> sce_jax parameter trees, and position-table extension."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.errors import InputError, one_line

# Keys a Hugging Face checkpoint may carry that hold no parameters.
_IGNORED_KEYS = ("bert.embeddings.position_ids",)
# How a bare encoder (BertModel, e.g. a sentence-transformers model) can be turned into a cross-encoder.
UNTRAINED_HEAD_HINT = (
    "convert it with `python -m sce_jax.convert SOURCE OUTPUT --add-untrained-head` to try the commands "
    "(the added classifier is random, so its scores mean nothing until the model is fine-tuned)"
)


class CheckpointError(InputError):
    """Weights that cannot be read or do not match the model config (one line naming the file and tensors)."""


def _listed(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _mapping(config: SparseCrossEncoderConfig) -> Iterator[tuple[tuple, tuple[str, ...], str]]:
    """(path in the sce_jax tree, Hugging Face keys, kind) for every parameter.

    kind "linear": HF weight [out, in] is our kernel [in, out]; "qkv": three HF linears fused into one kernel;
    "copy": same array.
    """
    emb = "bert.embeddings"
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        yield ("embeddings", name, "embedding"), (f"{emb}.{name}.weight",), "copy"
    yield ("embeddings", "layer_norm", "scale"), (f"{emb}.LayerNorm.weight",), "copy"
    yield ("embeddings", "layer_norm", "bias"), (f"{emb}.LayerNorm.bias",), "copy"
    for i in range(config.num_hidden_layers):
        hf = f"bert.encoder.layer.{i}"
        ours = ("layers", i)
        qkv = [f"{hf}.attention.self.{n}" for n in ("query", "key", "value")]
        yield (*ours, "qkv", "kernel"), tuple(f"{k}.weight" for k in qkv), "qkv"
        yield (*ours, "qkv", "bias"), tuple(f"{k}.bias" for k in qkv), "qkv"
        for name, hf_name in (
            ("attention_output", "attention.output.dense"),
            ("intermediate", "intermediate.dense"),
            ("output", "output.dense"),
        ):
            yield (*ours, name, "kernel"), (f"{hf}.{hf_name}.weight",), "linear"
            yield (*ours, name, "bias"), (f"{hf}.{hf_name}.bias",), "copy"
        for name, hf_name in (("attention_norm", "attention.output.LayerNorm"), ("output_norm", "output.LayerNorm")):
            yield (*ours, name, "scale"), (f"{hf}.{hf_name}.weight",), "copy"
            yield (*ours, name, "bias"), (f"{hf}.{hf_name}.bias",), "copy"
    for name, hf_name in (("pooler", "bert.pooler.dense"), ("classifier", "classifier")):
        yield (name, "kernel"), (f"{hf_name}.weight",), "linear"
        yield (name, "bias"), (f"{hf_name}.bias",), "copy"


def _hf_shape(path: tuple, config: SparseCrossEncoderConfig) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor (one of three for "qkv") behind the parameter at `path`, as BERT's
    config defines it: embedding tables [rows, hidden], linear weights [out, in], biases [out], norms [hidden]."""
    hidden, inter = config.hidden_size, config.intermediate_size
    rows = {"word_embeddings": config.vocab_size, "position_embeddings": config.max_position_embeddings,
            "token_type_embeddings": config.type_vocab_size}
    # (in, out) of each Hugging Face linear ("qkv": each of query, key and value).
    linears = {"qkv": (hidden, hidden), "attention_output": (hidden, hidden), "intermediate": (hidden, inter),
               "output": (inter, hidden), "pooler": (hidden, hidden), "classifier": (hidden, 1)}
    if path[-1] == "embedding":
        return (rows[path[-2]], hidden)
    if path[-2] in linears:
        in_features, out_features = linears[path[-2]]
        return (out_features, in_features) if path[-1] == "kernel" else (out_features,)
    return (hidden,)


def param_shapes(config: SparseCrossEncoderConfig) -> dict:
    """The parameter tree of a float32 model with this config, as shapes (nothing is allocated)."""
    shapes: dict = {}
    for path, keys, kind in _mapping(config):
        shape = _hf_shape(path, config)
        if kind == "linear":
            shape = shape[::-1]
        elif kind == "qkv":  # three [out, in] weights -> one [in, 3·out] kernel; three biases -> [3·out]
            shape = (*shape[1:], len(keys) * shape[0])
        _set(shapes, path, shape)
    return shapes


def _expected_hf_shapes(config: SparseCrossEncoderConfig) -> dict[str, tuple[int, ...]]:
    return {key: _hf_shape(path, config) for path, keys, _ in _mapping(config) for key in keys}


def _set(tree: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def is_bare_encoder(state: dict[str, Any]) -> bool:
    """A BertModel's weights (keys `embeddings.*`/`encoder.*`, or `bert.*` without a classifier)."""
    prefixed = any(k.startswith("bert.") for k in state)
    if not prefixed:
        return any(k.startswith("embeddings.") for k in state)
    return not any(k.startswith("classifier.") for k in state)


def with_untrained_head(state: dict[str, np.ndarray], config: SparseCrossEncoderConfig, *, seed: int = 0) -> dict:
    """A bare encoder's weights as a BertForSequenceClassification's, with a RANDOM single-logit classifier.

    Other heads (e.g. a masked-LM head's `cls.*`) are dropped. The classifier (and a pooler, if the encoder has
    none) is drawn like BERT's initialisation (normal, std 0.02, zero bias) from `seed`: the result runs every
    command, but its scores mean nothing until trained.
    """
    if not any(k.startswith("bert.") for k in state):  # BertModel's names lack the "bert." prefix
        state = {f"bert.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith("bert.")}  # e.g. drop a masked-LM head
    rng = np.random.default_rng(seed)
    hidden = config.hidden_size
    new = {"classifier.weight": (1, hidden), "bert.pooler.dense.weight": (hidden, hidden)}
    for name, shape in new.items():
        if name not in state:
            state[name] = rng.normal(0.0, 0.02, shape).astype(np.float32)
            state[name.replace(".weight", ".bias")] = np.zeros(shape[0], np.float32)
    return state


def hf_to_params(state: dict[str, np.ndarray], config: SparseCrossEncoderConfig, *, source: str = "checkpoint") -> dict:
    """Map a Hugging Face BertForSequenceClassification state dict to the sce_jax parameter tree.

    A mismatch is one CheckpointError line: how many tensors are missing, unexpected or misshaped, the first
    few of each.
    """
    expected = _expected_hf_shapes(config)
    present = {k for k in state if k not in _IGNORED_KEYS}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing and is_bare_encoder(state):
        raise CheckpointError(
            f"{source} holds a bare BERT encoder (BertModel, no classifier), not a sequence-classification "
            f"cross-encoder; {UNTRAINED_HEAD_HINT}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(present & set(expected))
        if tuple(np.shape(state[k])) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))

    params: dict = {}
    for path, keys, kind in _mapping(config):
        arrays = [np.asarray(state[k], dtype=np.float32) for k in keys]
        if kind == "copy":
            value = arrays[0]
        elif kind == "linear":
            value = arrays[0].T
        else:  # qkv: weights [out, in] -> kernel [in, 3·out]; biases concatenate
            value = np.concatenate([a.T if a.ndim == 2 else a for a in arrays], axis=-1)
        _set(params, path, np.ascontiguousarray(value))
    return params


def params_to_hf(params: dict, config: SparseCrossEncoderConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: original key names, float32 numpy arrays."""
    state = {}
    for path, keys, kind in _mapping(config):
        value = np.asarray(_get(params, path), dtype=np.float32)
        if kind == "copy":
            state[keys[0]] = value
        elif kind == "linear":
            state[keys[0]] = value.T
        else:
            for key, part in zip(keys, np.split(value, 3, axis=-1)):
                state[key] = part.T if part.ndim == 2 else part
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def read_hf_state_dict(directory: str | Path) -> dict[str, np.ndarray]:
    """Read model.safetensors (no torch needed) or pytorch_model.bin (needs torch) from a HF model directory."""
    directory = Path(directory)
    safetensors_file = directory / "model.safetensors"
    bin_file = directory / "pytorch_model.bin"
    if safetensors_file.exists():
        from safetensors.numpy import load_file

        try:
            return load_file(str(safetensors_file))
        except Exception as e:  # safetensors raises its own error type (and OSError, ValueError) for bad files
            raise CheckpointError(f"{safetensors_file}: cannot read the weights ({one_line(e)}); "
                                  "is the file truncated or corrupt?") from None
    if bin_file.exists():
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{bin_file} is a PyTorch pickle and reading it needs torch: pip install 'sce-jax[torch]' "
                "(or provide model.safetensors)"
            ) from None
        # weights_only: a checkpoint must never be able to run code.
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip/pickle, a refused (code-running) pickle, ...
            raise CheckpointError(f"{bin_file}: cannot read the weights ({one_line(e)}); "
                                  "is the file truncated, corrupt or not a plain tensor checkpoint?") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{bin_file}: not a state dict of tensors")
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def extend_position_embeddings(table: np.ndarray, new_length: int, trained_length: int | None = None) -> np.ndarray:
    """Stretch a position table to `new_length` rows by linear interpolation.

    The first `trained_length` rows (default: all) are taken as the trained part and resampled evenly onto
    `new_length` rows: new row i reads the old table at fractional position i·(trained_length-1)/(new_length-1),
    interpolating linearly between its two neighbours. Deterministic; row 0 and the last trained row are kept.
    """
    old_length = table.shape[0]
    trained_length = old_length if trained_length is None else trained_length
    if not 2 <= trained_length <= old_length:
        raise InputError(f"trained_length must be in [2, {old_length}], got {trained_length}")
    if new_length < old_length:
        raise InputError(f"cannot extend {old_length} positions to fewer ({new_length})")
    source = np.linspace(0.0, trained_length - 1, new_length)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, trained_length - 1)
    frac = (source - low)[:, None]
    return ((1.0 - frac) * table[low] + frac * table[high]).astype(table.dtype)
