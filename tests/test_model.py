"""The model against Hugging Face torch (full pattern) and an independent numpy reference (sparse patterns)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dense_reference
from flax import nnx
from sce_jax.kernels import cpu_attention
from sce_jax.batch import make_batch, pack_rows
from sce_jax.config import PATTERN_FLAGS, SparseCrossEncoderConfig
from sce_jax.encoder import build_model
from sce_jax.weights import hf_to_params, read_hf_state_dict
from scores import assert_batch_close

QUERIES = ["what did the hubble telescope achieve", "how to exit vim?"]
DOCS = [  # (query index, text)
    (0, "The Hubble telescope discovered two moons of Pluto, Nix and Hydra."),
    (1, "Press ESC, then type :wq and hit Enter to save and leave Vim."),
    (0, "Edwin Hubble, an astronomer with great achievement, completely reimagined our place in the universe; "
        "the telescope is named after him and has photographed galaxies billions of light years away."),
    (1, "Vim."),
    (0, "Telescopes in orbit avoid the blur of the atmosphere."),
]
RELEASED = {
    "cls_query_attention": True, "cls_doc_attention": True, "query_cls_attention": False,
    "query_doc_attention": False, "doc_cls_attention": True, "doc_query_attention": True,
}
ALL_TRUE = dict.fromkeys(PATTERN_FLAGS, True)


@pytest.fixture(scope="module")
def tiny_dir(tiny_sparse_dir):
    """The tiny random model for the sweeps: weights drawn wider than BERT's init (std 0.3), so that its logits
    are O(1) (about -1.4 to -0.5 on these documents, spread 0.44) and the tolerances below are small against them.
    (With BERT's std 0.02 the logits would all be 0.004, within 7e-5 of each other.) Tests set the attention
    pattern themselves, so the model's own sparse config does not matter."""
    return tiny_sparse_dir


def _assert_logits_are_order_one(logits, tolerance):
    """The model's logits are O(1) and spread far wider than `tolerance`, so that tolerance means something."""
    logits = np.asarray(logits)
    assert 0.3 < np.abs(logits).max() < 10 and np.ptp(logits) > 10 * tolerance, logits


@functools.lru_cache(maxsize=None)
def _tokens(model_dir: str):
    """Token ids the way the original feeds them, computed with transformers' own truncation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sep = tok.sep_token_id
    queries = [tok(q, truncation=True, max_length=32).input_ids[1:] + [sep] for q in QUERIES]
    docs = [tok(d, truncation=True, max_length=128).input_ids[1:] + [sep] for _, d in DOCS]
    return queries, docs


@functools.lru_cache(maxsize=None)
def _state_and_config(model_dir: str):
    return read_hf_state_dict(model_dir), json.loads((Path(model_dir) / "config.json").read_text())


def _batch(model_dir, *, extra_doc_slots=1, doc_length=64):
    queries, docs = _tokens(str(model_dir))
    return make_batch(
        queries, docs, [q for q, _ in DOCS],
        query_length=24, doc_length=doc_length, num_queries=len(queries) + 1, num_docs=len(docs) + extra_doc_slots,
    )


@nnx.jit(static_argnames="hidden")
def _run(model, batch, hidden=False):
    return model(batch, return_hidden_states=hidden)


def _model(model_dir, pattern, window, impl="xla"):
    if impl == "cpu" and not cpu_attention.available()[0]:
        pytest.skip(f"no CPU kernel: {cpu_attention.available()[1]}")
    state, hf_config = _state_and_config(str(model_dir))
    config = SparseCrossEncoderConfig.from_hf_dict(hf_config).replace(attention_window_size=window, **pattern)
    return build_model(config, hf_to_params(state, config), attention_impl=impl)


def test_full_pattern_matches_hf_torch(minilm_hf_dir):
    """Logits and every layer's hidden states of all groups equal BertForSequenceClassification's."""
    import torch
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(str(minilm_hf_dir)).eval()
    model = _model(minilm_hf_dir, ALL_TRUE, None)
    assert model.config.is_full_attention
    batch = _batch(minilm_hf_dir)
    scores, hidden = _run(model, batch, hidden=True)
    queries, docs = _tokens(str(minilm_hf_dir))
    max_diff = {"logits": 0.0, "hidden": 0.0}
    for d, ((q, _), doc) in enumerate(zip(DOCS, docs)):
        ids = [101, *queries[q], *doc]
        types = [0] * (1 + len(queries[q])) + [1] * len(doc)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]), output_hidden_states=True)
        np.testing.assert_allclose(scores[d], out.logits[0, 0].item(), atol=1e-5)
        max_diff["logits"] = max(max_diff["logits"], abs(float(scores[d]) - out.logits[0, 0].item()))
        for layer, ref in zip(hidden, out.hidden_states):
            ref = ref[0].numpy()
            ours = np.concatenate(
                [np.asarray(layer.cls[d])[None], np.asarray(layer.query[d, : len(queries[q])]), np.asarray(layer.doc[d, : len(doc)])]
            )
            np.testing.assert_allclose(ours, ref, atol=1e-5)
            max_diff["hidden"] = max(max_diff["hidden"], float(np.abs(ours - ref).max()))
    print(f"full pattern vs HF torch: max |diff| {max_diff}")


# (name, pattern, window, impl, weights): the real MiniLM-L6 weights for the released pattern, the tiny random
# model (fast) for the sweep over windows and flags.
CASES = [
    ("released", RELEASED, 4, "xla", "minilm"),
    ("released", RELEASED, 16, "dense", "minilm"),
    ("released", RELEASED, 1, "xla", "tiny"),
    ("released", RELEASED, 16, "xla", "tiny"),
    ("released", RELEASED, 1, "dense", "tiny"),
    ("all-true-windowed", ALL_TRUE, 4, "xla", "tiny"),
    ("query-sees-doc", {**RELEASED, "query_doc_attention": True}, 4, "xla", "tiny"),
    ("query-sees-cls", {**RELEASED, "query_cls_attention": True}, 1, "xla", "tiny"),
    ("no-cls-links", {**RELEASED, "cls_doc_attention": False, "doc_cls_attention": False}, 4, "xla", "tiny"),
    ("doc-alone", {**RELEASED, "doc_query_attention": False, "doc_cls_attention": False}, 16, "dense", "tiny"),
    ("cls-blind", {**RELEASED, "cls_query_attention": False}, None, "xla", "tiny"),
    # The C++ CPU kernel (full attention and a query that sees documents fall back to the XLA path).
    ("released", RELEASED, 4, "cpu", "minilm"),
    ("released", RELEASED, 1, "cpu", "tiny"),
    ("no-cls-links", {**RELEASED, "cls_doc_attention": False, "doc_cls_attention": False}, 16, "cpu", "tiny"),
    ("query-sees-doc", {**RELEASED, "query_doc_attention": True}, 4, "cpu", "tiny"),
]


@pytest.mark.parametrize("name,pattern,window,impl,weights", CASES, ids=[f"{c[0]}-w{c[2]}-{c[3]}-{c[4]}" for c in CASES])
def test_sparse_matches_dense_numpy_reference(request, name, pattern, window, impl, weights):
    model_dir = request.getfixturevalue("minilm_hf_dir" if weights == "minilm" else "tiny_dir")
    state, hf_config = _state_and_config(str(model_dir))
    model = _model(model_dir, pattern, window, impl)
    scores, hidden = _run(model, _batch(model_dir), hidden=True)
    # Without hidden states the last layer computes only [CLS]: the same scores.
    cls_only_scores = _run(model, _batch(model_dir))
    queries, docs = _tokens(str(model_dir))
    diffs = []
    for d, ((q, _), doc) in enumerate(zip(DOCS, docs)):
        logit, ref_hidden = dense_reference.forward(state, hf_config, queries[q], doc, pattern, window)
        diffs.append(max(abs(float(scores[d]) - logit), abs(float(cls_only_scores[d]) - logit)))
        last = hidden[-1]
        doc_rows = np.asarray(last.doc[d, : len(doc)])
        np.testing.assert_allclose(doc_rows, ref_hidden[-1, 1 + len(queries[q]) :], atol=1e-5)
    print(f"{name} window={window} impl={impl}: logits {np.asarray(scores[: len(DOCS)]).round(3)}, "
          f"max |logit diff| {max(diffs):.2e}")
    _assert_logits_are_order_one(scores[: len(DOCS)], 1e-5)
    assert max(diffs) <= 1e-5


PACKED_CASES = [c for c in CASES if not (c[1]["query_doc_attention"] or c[1]["query_cls_attention"])]


@pytest.mark.parametrize("name,pattern,window,impl,weights", PACKED_CASES,
                         ids=[f"{c[0]}-w{c[2]}-{c[3]}-{c[4]}" for c in PACKED_CASES])
def test_rows_of_several_documents_match_dense_numpy_reference(request, name, pattern, window, impl, weights):
    """Documents packed back to back in rows score as if alone: per-document logits and last-layer states."""
    model_dir = request.getfixturevalue("minilm_hf_dir" if weights == "minilm" else "tiny_dir")
    state, hf_config = _state_and_config(str(model_dir))
    model = _model(model_dir, pattern, window, impl)
    queries, docs = _tokens(str(model_dir))
    # Row 0: query 0's documents 2, 0, 4; row 1: query 1's 1, 3; row 2: padding. Four slots per row.
    rows, row_query = [[2, 0, 4], [1, 3], []], [0, 1, 0]
    batch = pack_rows(queries, [[docs[d] for d in row] for row in rows], row_query,
                      query_length=24, row_length=160, slots=4)
    scores, hidden = _run(model, batch, hidden=True)
    scores = np.asarray(scores).reshape(3, 4)
    cls_only_scores = np.asarray(_run(model, batch)).reshape(3, 4)
    for r, row in enumerate(rows):
        start = 0
        for c, d in enumerate(row):
            logit, ref_hidden = dense_reference.forward(state, hf_config, queries[row_query[r]], docs[d], pattern, window)
            assert abs(float(scores[r, c]) - logit) <= 1e-5, (name, r, c)
            assert abs(float(cls_only_scores[r, c]) - logit) <= 1e-5, (name, r, c)
            doc_rows = np.asarray(hidden[-1].doc[r, start : start + len(docs[d])])
            np.testing.assert_allclose(doc_rows, ref_hidden[-1, 1 + len(queries[row_query[r]]) :], atol=1e-5)
            start += len(docs[d])


def test_rows_of_several_documents_need_a_shared_query(tiny_dir):
    queries, docs = _tokens(str(tiny_dir))
    batch = pack_rows(queries, [[docs[0], docs[2]]], [0], query_length=24, row_length=128, slots=2)
    with pytest.raises(ValueError, match="several documents"):
        _run(_model(tiny_dir, {**RELEASED, "query_doc_attention": True}, 4), batch)


def test_scores_do_not_depend_on_batch_mates_or_padding(minilm_hf_dir):
    model = _model(minilm_hf_dir, RELEASED, 4)
    queries, docs = _tokens(str(minilm_hf_dir))
    reference = np.asarray(_run(model, _batch(minilm_hf_dir, extra_doc_slots=0, doc_length=48)))
    # More padding documents and a longer padded length.
    padded = np.asarray(_run(model, _batch(minilm_hf_dir, extra_doc_slots=5, doc_length=96)))[: len(DOCS)]
    # Other shapes only reorder float32 sums (the documented bound, BATCH_TOLERANCE); a padding token or a
    # batch-mate leaking into the attention moves a score by 1e-3 or more.
    assert_batch_close(padded, reference)
    # Each document alone with its query.
    for d, (q, _) in enumerate(DOCS):
        alone = make_batch([queries[q]], [docs[d]], [0], query_length=24, doc_length=48)
        assert_batch_close(np.asarray(_run(model, alone))[0], reference[d])


def test_doc_tokens_outside_window_get_zero_gradient(tiny_dir):
    """One layer: a document token's output depends only on document tokens within ±w."""
    window = 2
    model = _model(tiny_dir, RELEASED, window)
    queries, docs = _tokens(str(tiny_dir))
    batch = make_batch([queries[0]], [docs[2]], [0], query_length=16, doc_length=48)
    cfg = model.config
    layer = model.layers[0]
    x = jax.random.normal(jax.random.key(0), (1 + 16 + 48, cfg.hidden_size))
    from sce_jax.attention import TokenLayout

    layout = TokenLayout(1, 1, 1, 16, 48)
    doc_slot = jnp.where(jnp.asarray(batch.doc_ids != 0), 0, -1)
    masks = (jnp.asarray(batch.query_ids != 0), doc_slot, jnp.asarray(batch.doc_query))
    row = 20

    def doc_output(x):
        out = layer(x, layout, masks, impl="xla", interpret=False, dropout_rngs=[None, None])
        return layout.split(out).doc[0, row].sum()

    grad_doc = np.abs(np.asarray(layout.split(jax.jit(jax.grad(doc_output))(x)).doc[0])).sum(-1)
    near = np.abs(np.arange(48) - row) <= window
    assert np.all(grad_doc[~near] == 0)
    assert np.all(grad_doc[near & (batch.doc_ids[0] != 0)] > 0)


def test_bfloat16_compute_stays_close_to_float32(tiny_dir):
    """bfloat16 (8-bit mantissa) matmuls move these O(1) logits by ~0.02 (measured: 0.023 at most), a few
    percent of their spread; the tolerance is 0.04."""
    state, hf_config = _state_and_config(str(tiny_dir))
    config = SparseCrossEncoderConfig.from_hf_dict(hf_config).replace(attention_window_size=4, **RELEASED)
    params = hf_to_params(state, config)
    batch = _batch(tiny_dir, doc_length=48)
    full = np.asarray(_run(build_model(config, params), batch))[: len(DOCS)]
    half_model = build_model(config, params, dtype="bfloat16")
    half = np.asarray(_run(half_model, batch))[: len(DOCS)]
    print(f"bfloat16: logits {full.round(3)}, max |diff| {np.abs(half - full).max():.3f}")
    _assert_logits_are_order_one(full, 4e-2)
    assert half.dtype == np.float32
    assert half_model.layers[0].qkv.kernel[...].dtype == jnp.float32  # float32 master weights
    np.testing.assert_allclose(half, full, atol=4e-2)
    assert not np.array_equal(half, full)


def test_feed_forward_in_token_chunks_matches_dense_numpy_reference(tiny_dir, monkeypatch):
    """On CPU, batches of many tokens run the feed-forward block chunk by chunk (forced here with 16-token
    chunks): logits and last-layer document states still equal the numpy reference's. The chunk size is the
    model's static setting, chosen when it is built: tracing does not ask for the backend."""
    from sce_jax import model as model_module

    chunks = []
    unchunked = model_module.Layer._feed_forward_chunk
    monkeypatch.setattr(model_module, "CPU_TOKEN_CHUNK", 16)
    monkeypatch.setattr(
        model_module.Layer, "_feed_forward_chunk", lambda self, x, *a: chunks.append(x.shape[0]) or unchunked(self, x, *a)
    )
    state, hf_config = _state_and_config(str(tiny_dir))
    model = _model(tiny_dir, RELEASED, 4)
    assert model.token_chunk == 16 and all(layer.token_chunk == 16 for layer in model.layers)
    monkeypatch.setattr(model_module, "default_token_chunk", lambda: pytest.fail("backend read while tracing"))
    batch = _batch(tiny_dir, doc_length=80)  # a shape no other test compiles
    scores, hidden = _run(model, batch, hidden=True)
    cls_only_scores = _run(model, batch)
    assert max(chunks) <= 16 and len(chunks) > 2 * model.config.num_hidden_layers
    queries, docs = _tokens(str(tiny_dir))
    _assert_logits_are_order_one(scores[: len(DOCS)], 1e-5)
    for d, ((q, _), doc) in enumerate(zip(DOCS, docs)):
        logit, ref_hidden = dense_reference.forward(state, hf_config, queries[q], doc, RELEASED, 4)
        assert abs(float(scores[d]) - logit) <= 1e-5 and abs(float(cls_only_scores[d]) - logit) <= 1e-5
        np.testing.assert_allclose(np.asarray(hidden[-1].doc[d, : len(doc)]), ref_hidden[-1, 1 + len(queries[q]) :], atol=1e-5)


def _dot_precisions(lowered_text: str) -> list[str]:
    """The precision attribute of every dot_general in StableHLO text ('' where it has none)."""
    dots = [line for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]
    return [line.split("precision = ", 1)[1].split("]")[0] + "]" if "precision = " in line else "" for line in dots]


@pytest.mark.parametrize("dtype, expected", [("float32", "[HIGHEST, HIGHEST]"), ("tf32", "[HIGH, HIGH]")])
def test_float32_matmuls_carry_their_precision_forward_and_backward(tiny_dir, dtype, expected):
    """GPUs multiply float32 in TF32 unless a dot asks for more: dtype float32 marks every matmul of the forward
    and backward pass HIGHEST (full float32); only tf32 opts into TF32 (jax's "tensorfloat32", lowered as HIGH).
    CPU scores are the same for both."""
    state, hf_config = _state_and_config(str(tiny_dir))
    config = SparseCrossEncoderConfig.from_hf_dict(hf_config).replace(attention_window_size=4, **RELEASED)
    model = build_model(config, hf_to_params(state, config), dtype=dtype, attention_impl="xla")
    graphdef, params = nnx.split(model)
    batch = _batch(tiny_dir, doc_length=48)

    def loss(params):
        return nnx.merge(graphdef, params)(batch).sum()

    precisions = _dot_precisions(jax.jit(jax.value_and_grad(loss)).lower(params).as_text())
    # Forward matmuls and, for each, the backward's transposed ones (at least the 6 per layer of the forward).
    assert len(precisions) >= 6 * 2 * config.num_hidden_layers, precisions
    assert set(precisions) == {expected}, precisions
    float32 = np.asarray(_run(build_model(config, hf_to_params(state, config), attention_impl="xla"), batch))
    np.testing.assert_array_equal(np.asarray(_run(model, batch)), float32)
