"""The original's query/document tokenization, from a checkpoint's own tokenizer files.

The original feeds `tokenizer(text, truncation=True, max_length=...).input_ids[1:]` (wordpieces + [SEP], [CLS]
stripped) and appends one more [SEP]. For BERT WordPiece tokenizers that equals the first `max_length - 2`
wordpieces + [SEP], which is what is computed here, so whole documents can also be kept for MaxP chunking.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from sce_jax.errors import InputError, SettingsError, one_line

# Files that make up a Hugging Face tokenizer; copied along with converted checkpoints.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class TextError(InputError):
    """A text the tokenizer cannot take (not a string, or not encodable Unicode such as a lone surrogate).

    `index` is its position in the list given to the tokenizer, so a caller can name the file and line.
    """

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def text_problem(text) -> str | None:
    """Why `text` cannot be tokenized, or None if it can."""
    if not isinstance(text, str):
        return f"not a string but {type(text).__name__} {text!r:.40}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode ({e.reason} {text[e.start]!r} at character {e.start})"
    return None


def check_lengths(max_length, max_query_length) -> None:
    """SettingsError (naming the setting) unless the lengths leave room for a query and a document."""
    for name, value, least in (("max_query_length", max_query_length, 3), ("max_length", max_length, 8)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise SettingsError(name, f"{name} must be an integer >= {least}, got {value!r}")
    if max_length < max_query_length + 4:
        raise SettingsError(
            "max_length", f"max_length {max_length} leaves no room for documents after {max_query_length} query tokens"
        )


class QueryDocTokenizer:
    def __init__(self, tokenizer, *, cls_token_id: int, sep_token_id: int, pad_token_id: int, max_length: int = 512,
                 max_query_length: int = 32):
        """`tokenizer`: a `tokenizers.Tokenizer` (no truncation, no padding)."""
        check_lengths(max_length, max_query_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_query_length = max_query_length
        self.sep_token_id = sep_token_id
        self.cls_token_id = cls_token_id
        self.pad_token_id = pad_token_id

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path, **kwargs) -> QueryDocTokenizer:
        directory = Path(directory)
        if not any((directory / f).exists() for f in ("tokenizer.json", "vocab.txt")):
            raise InputError(f"{directory} has no tokenizer files (tokenizer.json or vocab.txt)")
        check_lengths(kwargs.get("max_length", 512), kwargs.get("max_query_length", 32))
        try:
            tokenizer, special_ids = _load_tokenizer(directory)
        except Exception as e:  # a corrupt tokenizer.json/vocab.txt raises anything from JSON to Rust errors
            raise InputError(f"{directory}: cannot load the tokenizer ({one_line(e)})") from None
        if None in special_ids.values():
            raise InputError(f"{directory}: the tokenizer has no [CLS], [SEP] or [PAD] token")
        return cls(tokenizer, **special_ids, **kwargs)

    def _wordpieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Wordpiece ids of each text, untruncated (the callers cut them). A text the tokenizer cannot take is a
        TextError naming its index."""
        texts = list(texts)
        try:
            return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        except (TypeError, ValueError) as error:
            for index, text in enumerate(texts):
                problem = text_problem(text)
                if problem is not None:
                    raise TextError(index, f"text {index}: {problem}") from None
            raise error

    def encode_queries(self, queries: Sequence[str]) -> list[list[int]]:
        """Query wordpieces (at most max_query_length - 2) + [SEP] + [SEP]."""
        sep = self.sep_token_id
        return [ids[: self.max_query_length - 2] + [sep, sep] for ids in self._wordpieces(queries)]

    def doc_budget(self, query_tokens: Sequence[int]) -> int:
        """Document wordpieces that fit with this query: [CLS] + query + wordpieces + [SEP] [SEP] <= max_length."""
        return self.max_length - 1 - len(query_tokens) - 2

    def encode_docs(
        self, query_tokens: Sequence[Sequence[int]], docs: Sequence[str], *, truncate: bool = True
    ) -> list[list[int]]:
        """Document wordpieces + [SEP] + [SEP]; `query_tokens[i]` is document i's encoded query.

        With truncate=False the wordpieces are returned whole (without [SEP]s) for the caller to cut.
        """
        if len(query_tokens) != len(docs):
            raise ValueError(f"{len(query_tokens)} queries for {len(docs)} documents")
        pieces = self._wordpieces(docs)
        if not truncate:
            return pieces
        sep = self.sep_token_id
        return [ids[: self.doc_budget(q)] + [sep, sep] for q, ids in zip(query_tokens, pieces)]


def _special_token(directory: Path, name: str, default: str) -> str:
    """The text of special token `name` (e.g. "sep_token") from tokenizer_config.json or special_tokens_map.json."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / file
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
            if isinstance(value, dict):  # {"content": "[SEP]", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                return value
    return default


def _load_tokenizer(directory: Path) -> tuple[Tokenizer, dict[str, int | None]]:
    """The directory's tokenizer without truncation or padding, and the ids of [CLS], [SEP] and [PAD].

    tokenizer.json is read with the `tokenizers` library itself: transformers' AutoTokenizer builds the same
    tokenizer from it, but importing transformers imports torch where it is installed (seconds of every command's
    start-up). Only a directory without tokenizer.json (vocab.txt) goes through AutoTokenizer.
    """
    if (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        names = {"cls_token_id": ("cls_token", "[CLS]"), "sep_token_id": ("sep_token", "[SEP]"),
                 "pad_token_id": ("pad_token", "[PAD]")}
        special_ids = {key: tokenizer.token_to_id(_special_token(directory, *name)) for key, name in names.items()}
    else:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(directory))
        tokenizer = loaded.backend_tokenizer
        special_ids = {key: getattr(loaded, key) for key in ("cls_token_id", "sep_token_id", "pad_token_id")}
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, special_ids
