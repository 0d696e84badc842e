"""Model configuration: BERT sizes plus the sparse cross-encoder attention pattern."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.attention_window_size is not None and self.attention_window_size < 1:
            raise ValueError(f"attention_window_size must be >= 1 or None, got {self.attention_window_size}")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (gelu, gelu_new or relu)")

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
    def from_hf_dict(cls, hf: dict[str, Any]) -> SparseCrossEncoderConfig:
        """Read a Hugging Face config.json dict.

        A config without the sparse fields (a plain BERT cross-encoder such as
        cross-encoder/ms-marco-MiniLM-L-6-v2) is the full attention pattern.
        """
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"only BERT models are supported, config has model_type={hf.get('model_type')!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a re-ranker needs a single-logit classifier, config has {num_labels} labels")
        kwargs = {k: hf.get(k, default) for k, default in _BERT_FIELDS.items()}
        kwargs["cls_token_id"] = hf.get("cls_token_id", 101)
        kwargs["sep_token_id"] = hf.get("sep_token_id", 102)
        sparse = "attention_window_size" in hf or any(f in hf for f in PATTERN_FLAGS)
        kwargs["attention_window_size"] = hf.get("attention_window_size") if sparse else None
        for flag in PATTERN_FLAGS:
            kwargs[flag] = bool(hf.get(flag, True))
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
        with open(path) as f:
            try:
                return cls.from_hf_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def released_pattern() -> dict[str, Any]:
    """The released models' window and flags (the config defaults), e.g. to make a full cross-encoder sparse."""
    default = SparseCrossEncoderConfig()
    return {name: getattr(default, name) for name in ("attention_window_size", *PATTERN_FLAGS)}
