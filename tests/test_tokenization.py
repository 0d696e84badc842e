"""Tokenization against the original pipeline, computed with transformers' own truncation."""

from __future__ import annotations

import numpy as np
import pytest

from sce_jax import SparseCrossEncoder
from sce_jax.errors import InputError, SettingsError
from sce_jax.tokenization import QueryDocTokenizer
from scores import assert_batch_close

LONG_QUERY = "what are the long term effects of " + "very " * 40 + "strong coffee"
QUERIES = ["hubble telescope achievements", LONG_QUERY]
DOCS = ["The Hubble telescope discovered two moons of Pluto.", "Coffee " * 300, "x"]


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.mark.parametrize("max_length", [64, 512])
def test_matches_original_pipeline(minilm_dir, hf_tokenizer, max_length):
    tok = QueryDocTokenizer.from_dir(minilm_dir, max_length=max_length, max_query_length=32)
    sep = hf_tokenizer.sep_token_id
    for query in QUERIES:
        # The original: query ids without [CLS] (max 32 with it), then one more [SEP].
        original_q = hf_tokenizer(query, truncation=True, max_length=32).input_ids[1:]
        (ours_q,) = tok.encode_queries([query])
        assert ours_q == original_q + [sep]
        ours_docs = tok.encode_docs([ours_q] * len(DOCS), DOCS)
        for doc, ours_d in zip(DOCS, ours_docs):
            # Our budget is the original's minus 2, so every position (with the appended [SEP]s) fits.
            original_d = hf_tokenizer(doc, truncation=True, max_length=max_length - len(original_q) - 2).input_ids[1:]
            assert ours_d == original_d + [sep]
            assert 1 + len(ours_q) + len(ours_d) <= max_length
    assert len(tok.encode_queries([LONG_QUERY])[0]) == 32


def test_truncated_document_fills_the_positions_exactly(minilm_dir):
    tok = QueryDocTokenizer.from_dir(minilm_dir, max_length=64)
    (q,) = tok.encode_queries(["coffee"])
    (d,) = tok.encode_docs([q], ["coffee " * 200])
    assert 1 + len(q) + len(d) == 64
    (whole,) = tok.encode_docs([q], ["coffee " * 200], truncate=False)
    assert len(whole) == 200


def test_score_keeps_input_order_and_ignores_batch_mates(tiny_sparse_dir):
    """On a model whose logits are O(1) and differ between documents (several documents share a row here), so
    that a batch mate's influence would move a score far beyond the documented batch tolerance."""
    encoder = SparseCrossEncoder.load(tiny_sparse_dir, max_length=128)
    docs = ["short", "a much longer document " * 8, "medium length text here", "x " * 60]
    together = encoder.score("query text", docs, batch_size=2)
    alone = np.array([encoder.score("query text", [d])[0] for d in docs])
    reversed_order = encoder.score("query text", docs[::-1], batch_size=4)[::-1]
    assert_batch_close(together, alone)
    assert_batch_close(together, reversed_order)
    assert np.abs(together).max() > 0.1 and np.diff(np.sort(together)).min() > 1e-3  # O(1), distinct


def test_errors_are_clear(tiny_hf_dir, tmp_path):
    with pytest.raises(SettingsError, match="exceeds the model's 128 positions"):
        SparseCrossEncoder.load(tiny_hf_dir, max_length=512)
    with pytest.raises(InputError, match="no tokenizer files"):
        QueryDocTokenizer.from_dir(tmp_path)


def test_wordpieces_equal_transformers_autotokenizer(minilm_dir, tiny_sparse_dir):
    """tokenizer.json is read with the tokenizers library (no transformers import): the same wordpieces and special
    tokens as Hugging Face's AutoTokenizer, for accents, CJK, emoji, control characters, long and empty texts."""
    from transformers import AutoTokenizer

    texts = ["The Café Müller's naïve façade", "東京タワー は 高い", "emoji 🐝🍯 and symbols ©®™ ½", "tab\there\nnew line",
             "UPPER lower MiXeD 123,456.78", "", " ", "a" * 3000, "don't stop-believing (1990s) [CLS] [SEP]",
             "\u200b zero width \u00ad soft hyphen", "ﬁ ligature Ⅻ roman"]
    for directory in (minilm_dir, tiny_sparse_dir):
        ours = QueryDocTokenizer.from_dir(directory)
        reference = AutoTokenizer.from_pretrained(str(directory))
        expected = reference(texts, add_special_tokens=False, verbose=False)["input_ids"]
        assert ours.encode_docs([[0]] * len(texts), texts, truncate=False) == expected
        assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (
            reference.cls_token_id, reference.sep_token_id, reference.pad_token_id)
        assert ours.vocab_size == len(reference)
