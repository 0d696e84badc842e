"""The original's query/document tokenization, from a checkpoint's own tokenizer files.

The original feeds `tokenizer(text, truncation=True, max_length=...).input_ids[1:]` (wordpieces + [SEP], [CLS]
stripped) and appends one more [SEP]. For BERT WordPiece tokenizers that equals the first `max_length - 2`
wordpieces + [SEP], which is what is computed here, so whole documents can also be kept for MaxP chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Files that make up a Hugging Face tokenizer; copied along with converted checkpoints.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class QueryDocTokenizer:
    def __init__(self, tokenizer, *, max_length: int = 512, max_query_length: int = 32):
        if max_query_length < 3:
            raise ValueError(f"max_query_length must be >= 3, got {max_query_length}")
        if max_length < max_query_length + 4:
            raise ValueError(f"max_length {max_length} leaves no room for documents after {max_query_length} query tokens")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_query_length = max_query_length
        self.sep_token_id = tokenizer.sep_token_id
        self.cls_token_id = tokenizer.cls_token_id
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_dir(cls, directory: str | Path, **kwargs) -> QueryDocTokenizer:
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not any((directory / f).exists() for f in ("tokenizer.json", "vocab.txt")):
            raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer.json or vocab.txt)")
        return cls(AutoTokenizer.from_pretrained(str(directory)), **kwargs)

    def _wordpieces(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]

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
