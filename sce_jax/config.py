"""Model configuration: BERT sizes plus the sparse cross-encoder attention pattern."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from sce_jax.errors import InputError, located

# The attention implementations (`sce_jax.attention`) and compute dtypes (`sce_jax.encoder.DTYPES`) by name:
# here, where the commands can check their flags without importing JAX.
ATTENTION_IMPLS = ("auto", "cpu", "xla", "dense", "pallas", "triton")
DTYPE_NAMES = ("float32", "tf32", "bfloat16", "int8")

# Which token group may see which other group. [CLS]->[CLS], query->query and doc->doc (within the window) are
# always on; these flags switch the cross-group edges. All True and window None is a standard BERT cross-encoder.
PATTERN_FLAGS = (
    "cls_query_attention",
    "cls_doc_attention",
    "query_cls_attention",
    "query_doc_attention",
    "doc_cls_attention",
    "doc_query_attention",
)

# Fields of a Hugging Face BERT config.json that this model uses, with their BERT defaults.
_BERT_FIELDS = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}


@dataclasses.dataclass(frozen=True)
class SparseCrossEncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    # The released models' pattern (window 4, query isolated from [CLS] and documents).
    attention_window_size: int | None = 4
    cls_query_attention: bool = True
    cls_doc_attention: bool = True
    query_cls_attention: bool = False
    query_doc_attention: bool = False
    doc_cls_attention: bool = True
    doc_query_attention: bool = True

    def __post_init__(self):
        problem = _first_problem(self)
        if problem is not None:
            field, message = problem
            raise InputError(f"{field}: {message}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_is_shared(self) -> bool:
        """The query sees only itself, so one encoding serves all documents of that query."""
        return not (self.query_cls_attention or self.query_doc_attention)

    @property
    def is_full_attention(self) -> bool:
        return self.attention_window_size is None and all(getattr(self, f) for f in PATTERN_FLAGS)

    def replace(self, **changes: Any) -> SparseCrossEncoderConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str | os.PathLike = "config.json") -> SparseCrossEncoderConfig:
        """Read a Hugging Face config.json dict.

        A config without the sparse fields (a plain BERT cross-encoder such as
        cross-encoder/ms-marco-MiniLM-L-6-v2) is the full attention pattern. A bad value raises an InputError
        naming `source` and the field.
        """
        if not isinstance(hf, dict):
            raise InputError(f"{source}: expected a JSON object of settings, got {type(hf).__name__}")

        def bad(field: str, message: str) -> InputError:
            return located(source, f"field {field}", message)

        if hf.get("model_type", "bert") != "bert":
            raise bad("model_type", f"only BERT models are supported, got {hf.get('model_type')!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise bad("position_embedding_type", "only absolute position embeddings are supported")
        if "id2label" in hf:
            if not isinstance(hf["id2label"], dict):
                raise bad("id2label", f"expected an object, got {type(hf['id2label']).__name__}")
            num_labels, label_field = len(hf["id2label"]), "id2label"
        else:
            num_labels, label_field = hf.get("num_labels", 1), "num_labels"
        if num_labels != 1:
            raise bad(label_field, f"a re-ranker needs a single-logit classifier, config has {num_labels!r} labels")
        kwargs = {k: hf.get(k, default) for k, default in _BERT_FIELDS.items()}
        for name, default in (("pad_token_id", 0), ("cls_token_id", 101), ("sep_token_id", 102)):
            kwargs[name] = default if hf.get(name) is None else hf[name]  # configs may say null
        sparse = "attention_window_size" in hf or any(f in hf for f in PATTERN_FLAGS)
        kwargs["attention_window_size"] = hf.get("attention_window_size") if sparse else None
        for flag in PATTERN_FLAGS:
            kwargs[flag] = hf.get(flag, True)
        problem = _first_problem(kwargs)
        if problem is not None:
            raise bad(*problem)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that Hugging Face BERT and the original sparse cross-encoder code both read."""
        hf: dict[str, Any] = {
            "architectures": [
                "BertForSequenceClassification" if self.is_full_attention else "ListformerModelForSequenceClassification"
            ],
            "model_type": "bert",
            "position_embedding_type": "absolute",
            "num_labels": 1,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
        }
        for field in dataclasses.fields(self):
            hf[field.name] = getattr(self, field.name)
        return hf

    @classmethod
    def from_json(cls, path: str | Path) -> SparseCrossEncoderConfig:
        """Read config.json; an unreadable file, bad JSON or a bad value is one InputError naming the file."""
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            hf = json.loads(text)
        except json.JSONDecodeError as e:
            raise located(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno})") from None
        return cls.from_hf_dict(hf, source=path)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")
_TOKEN_ID_FIELDS = ("pad_token_id", "cls_token_id", "sep_token_id")
_FLOAT_FIELDS = ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_problem(values: Any) -> tuple[str, str] | None:
    """(field, what is wrong) for the first invalid value of a config (a dict or the dataclass), else None."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    for name in _INT_FIELDS:
        if not _is_int(get(name)) or get(name) < 1:
            return name, f"must be a positive integer, got {get(name)!r}"
    for name in _TOKEN_ID_FIELDS:
        if not _is_int(get(name)) or not 0 <= get(name) < get("vocab_size"):
            return name, f"must be a token id in 0..{get('vocab_size') - 1}, got {get(name)!r}"
    for name in _FLOAT_FIELDS:
        value = get(name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return name, f"must be a number, got {value!r}"
        if not (0 < value < 1 if name == "layer_norm_eps" else 0 <= value < 1):
            return name, f"must be in {'(0, 1)' if name == 'layer_norm_eps' else '[0, 1)'}, got {value!r}"
    if get("type_vocab_size") < 2:
        return "type_vocab_size", f"must be >= 2 (queries have token type 0, documents 1), got {get('type_vocab_size')}"
    if get("hidden_size") % get("num_attention_heads"):
        return "num_attention_heads", (
            f"{get('num_attention_heads')} does not divide hidden_size {get('hidden_size')}")
    if get("hidden_act") not in ("gelu", "gelu_new", "relu"):
        return "hidden_act", f"unsupported {get('hidden_act')!r} (gelu, gelu_new or relu)"
    window = get("attention_window_size")
    if window is not None and (not _is_int(window) or window < 1):
        return "attention_window_size", f"must be an integer >= 1 or null, got {window!r}"
    for name in PATTERN_FLAGS:
        if not isinstance(get(name), bool):
            return name, f"must be true or false, got {get(name)!r}"
    return None


def released_pattern() -> dict[str, Any]:
    """The released models' window and flags (the config defaults), e.g. to make a full cross-encoder sparse."""
    default = SparseCrossEncoderConfig()
    return {name: getattr(default, name) for name in ("attention_window_size", *PATTERN_FLAGS)}
