"""The C++ CPU attention kernel (kernels/cpu_attention.cc) against a float64 numpy attention that applies the
design note's mask (tests/dense_reference.py) to each document's own sequence [CLS] + query + document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax.kernels import cpu_attention
from sce_jax import attention
from sce_jax.attention import TokenLayout
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.model import doc_segments
import dense_reference

pytestmark = pytest.mark.skipif(not cpu_attention.available()[0], reason=f"no CPU kernel: {cpu_attention.available()[1]}")

RELEASED = dict(cls_query_attention=True, cls_doc_attention=True, query_cls_attention=False, query_doc_attention=False,
                doc_cls_attention=True, doc_query_attention=True)
PATTERNS = {
    "released": RELEASED,
    "no-cls-links": {**RELEASED, "cls_doc_attention": False, "doc_cls_attention": False},
    "doc-alone": {**RELEASED, "doc_query_attention": False, "doc_cls_attention": False},
    "cls-blind": {**RELEASED, "cls_query_attention": False},
}


def flags_of(pattern: dict) -> int:
    return (cpu_attention.CLS_QUERY * pattern["cls_query_attention"] | cpu_attention.CLS_DOC * pattern["cls_doc_attention"]
            | cpu_attention.DOC_CLS * pattern["doc_cls_attention"] | cpu_attention.DOC_QUERY * pattern["doc_query_attention"])


def make_problem(slots, *, heads=2, head_dim=32, seed=0):
    """A flat token matrix of 3 rows (the last all padding when slots > 1), 2 queries (one of them padding
    tokens only in its tail), and the documents' lengths."""
    rng = np.random.default_rng(seed)
    num_rows, num_queries, query_length, row_length = 3, 2, 6, 24
    if slots == 1:
        lengths = np.array([[24], [9], [1]])
    else:
        lengths = np.array([[7, 1, 12, 0], [5, 5, 0, 0], [0, 0, 0, 0]])[:, :slots]
    query_lengths = np.array([6, 3])
    doc_query = np.array([1, 0, 1])
    layout = TokenLayout(num_rows, slots, num_queries, query_length, row_length)
    qkv = rng.standard_normal((sum(layout.sizes), 3, heads, head_dim)).astype(np.float32)
    return dict(qkv=qkv, layout=layout, lengths=lengths, query_lengths=query_lengths, doc_query=doc_query)


def reference(p, pattern, window):
    """{token index: [H, K] output} for every real token, from each document's own dense masked sequence."""
    qkv, layout, lengths = p["qkv"].astype(np.float64), p["layout"], p["lengths"]
    (num_rows, slots), (_, query_length), (_, row_length) = layout.shapes
    query_base, doc_base = layout.sizes[0], layout.sizes[0] + layout.sizes[1]
    expected = {}
    for d in range(num_rows):
        start = 0
        for c in range(slots):
            n, q = int(lengths[d, c]), int(p["doc_query"][d])
            query = [query_base + q * query_length + i for i in range(p["query_lengths"][q])]
            tokens = [d * slots + c, *query, *(doc_base + d * row_length + start + j for j in range(n))]
            mask = dense_reference.attention_mask(len(query), n, pattern, window)
            x = qkv[tokens]
            scores = np.einsum("ihk,jhk->hij", x[:, 0], x[:, 1]) / np.sqrt(x.shape[-1])
            scores = np.where(mask[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for t, row in zip(tokens, np.einsum("hij,jhk->ihk", probs, x[:, 2])):
                expected[t] = row
            start += n
    return expected


def run_kernel(p, pattern, window, *, cls_only=False):
    layout = p["layout"]
    (num_rows, slots), (num_queries, query_length), (_, row_length) = layout.shapes
    doc_slot, _ = doc_segments(jnp.asarray(p["lengths"]), row_length)
    query_mask = np.arange(query_length)[None, :] < p["query_lengths"][:, None]
    qkv = jnp.asarray(p["qkv"])
    q = qkv[: num_rows * slots, :1] if cls_only else qkv
    kv = qkv[:, 1:] if cls_only else qkv
    flags = flags_of(pattern) | (cpu_attention.CLS_ONLY if cls_only else 0)
    return np.asarray(cpu_attention.cpu_attention(q, kv, doc_slot, jnp.asarray(p["doc_query"]), jnp.asarray(query_mask),
                                                  window=window, flags=flags))


@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("window", [1, 3, 40])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_kernel_matches_dense_numpy_attention(slots, window, pattern):
    p = make_problem(slots)
    expected = reference(p, PATTERNS[pattern], window)
    out = run_kernel(p, PATTERNS[pattern], window)
    assert out.shape == (sum(p["layout"].sizes), 2, 32)
    worst = max(np.abs(out[t] - row).max() for t, row in expected.items())
    assert worst <= 1e-5, worst

    # [CLS]-only mode (the last layer): the same [CLS] outputs, nothing else.
    cls_out = run_kernel(p, PATTERNS[pattern], window, cls_only=True)
    num_cls = p["layout"].sizes[0]
    assert cls_out.shape == (num_cls, 2, 32)
    np.testing.assert_allclose(cls_out, np.stack([expected[t] for t in range(num_cls)]), atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_kernel_head_dims(head_dim):
    """32 and 64 are compiled as fixed sizes, other head sizes take the generic loop."""
    p = make_problem(4, heads=3, head_dim=head_dim, seed=1)
    expected = reference(p, RELEASED, 4)
    out = run_kernel(p, RELEASED, 4)
    assert max(np.abs(out[t] - row).max() for t, row in expected.items()) <= 1e-5


@pytest.mark.parametrize("cls_only", [False, True], ids=["all-tokens", "cls-only"])
def test_layer_attention_gradients_match_dense_path(cls_only):
    """`cpu_layer_attention` runs the kernel forward and differentiates through the XLA band path; values and
    gradients against the dense masked path (`impl="dense"`), which shares neither."""
    config = SparseCrossEncoderConfig(hidden_size=64, num_attention_heads=2, intermediate_size=64, attention_window_size=3)
    p = make_problem(4)
    layout = p["layout"]
    doc_slot, _ = doc_segments(jnp.asarray(p["lengths"]), layout.shapes[2][1])
    query_mask = jnp.arange(layout.shapes[1][1])[None, :] < jnp.asarray(p["query_lengths"])[:, None]
    masks = (query_mask, doc_slot, jnp.asarray(p["doc_query"]))
    num_cls = layout.sizes[0]
    real = np.concatenate([np.ones(num_cls, bool), np.asarray(query_mask).reshape(-1), np.asarray(doc_slot >= 0).reshape(-1)])
    if cls_only:
        real[num_cls:] = False
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((len(real), 2, 32)) * real[:, None, None], jnp.float32)

    def loss(qkv, impl):
        if impl == "dense":
            q, k, v = (layout.split(qkv[:, i]) for i in range(3))
            out = layout.join(attention.sparse_attention(q, k, v, *masks, config, impl="dense"))
            return jnp.sum(out * cotangent)
        if cls_only:
            out = attention.cpu_layer_attention(qkv[:num_cls, :1], qkv[:, 1:], *masks, config, layout, cls_only=True)
            return jnp.sum(out * cotangent[:num_cls])
        return jnp.sum(attention.cpu_layer_attention(qkv, qkv, *masks, config, layout) * cotangent)

    qkv = jnp.asarray(p["qkv"])
    (value, grad), (ref_value, ref_grad) = (jax.value_and_grad(loss)(qkv, impl) for impl in ("cpu", "dense"))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    assert float(jnp.abs(grad).max()) > 0


def test_inconsistent_shapes_are_rejected():
    p = make_problem(1)
    qkv = jnp.asarray(p["qkv"])
    doc_slot = jnp.zeros((3, 24), jnp.int32)
    query_mask = jnp.ones((2, 6), bool)
    with pytest.raises(Exception, match="inconsistent shapes"):
        # One token short of the layout.
        cpu_attention.cpu_attention(qkv[1:], qkv[1:], doc_slot, jnp.zeros(3, jnp.int32), query_mask, window=2, flags=15)
    with pytest.raises(Exception, match="doc_query out of range"):
        cpu_attention.cpu_attention(qkv, qkv, doc_slot, jnp.full(3, 5, jnp.int32), query_mask, window=2, flags=15)


def test_without_a_compiler_auto_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(tmp_path / "cache"))
    cpu_attention.available.cache_clear()
    attention._warn_once.cache_clear()
    try:
        ok, why = cpu_attention.available()
        assert not ok and "no-such-compiler" in why
        with pytest.warns(RuntimeWarning, match="CPU attention kernel is unavailable"):
            assert attention.resolve_attention_impl("auto") == "xla"
        with pytest.raises(RuntimeError, match="attention_impl='cpu'"):
            attention.resolve_attention_impl("cpu")
    finally:
        monkeypatch.undo()
        cpu_attention.available.cache_clear()
        attention._warn_once.cache_clear()
    assert cpu_attention.available() == (True, "")


@pytest.mark.parametrize("overrides,expected", [
    ({}, "cpu"),
    ({"attention_window_size": None}, "xla"),  # full attention
    ({"query_doc_attention": True}, "xla"),  # the query's encoding depends on the document
])
def test_patterns_the_kernel_does_not_cover_run_the_xla_path(overrides, expected):
    from flax import nnx

    from sce_jax.model import SparseCrossEncoderModel

    config = SparseCrossEncoderConfig(hidden_size=64, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                                      attention_window_size=4, **RELEASED).replace(**overrides)
    model = nnx.eval_shape(lambda: SparseCrossEncoderModel(config, rngs=nnx.Rngs(0), attention_impl="cpu"))
    assert model.attention_impl == expected


def test_an_unusable_cache_directory_makes_the_kernel_unavailable(tmp_path, monkeypatch):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(not_a_directory / "cache"))
    cpu_attention.available.cache_clear()
    try:
        ok, why = cpu_attention.available()
        assert not ok and "Error" in why
    finally:
        monkeypatch.undo()
        cpu_attention.available.cache_clear()
    assert cpu_attention.available() == (True, "")
