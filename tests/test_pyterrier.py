"""The PyTerrier re-ranker in pipelines built from a static result frame (no index, no Java)."""

import numpy as np
import pandas as pd
import pytest

pt = pytest.importorskip("pyterrier")

from sce_jax.pyterrier import SparseCrossEncoderReRanker  # noqa: E402
from scores import assert_batch_close  # noqa: E402

MAX_LENGTH = 64
MAX_QUERY_LENGTH = 16


@pytest.fixture(scope="module")
def encoder(tiny_sparse_dir):
    from sce_jax.encoder import SparseCrossEncoder

    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)


@pytest.fixture(scope="module")
def results():
    """A first-stage result frame: two queries, documents with a BM25-like score and rank."""
    return pd.DataFrame({
        "qid": ["q1"] * 4 + ["q2"] * 3,
        "query": ["where do cats sit"] * 4 + ["banana bread recipe"] * 3,
        "docno": ["d1", "d2", "d3", "d4", "d5", "d6", "d7"],
        "text": ["the cat sat on the mat", "dogs chase cats in the park", "stock markets fell sharply today",
                 "cats sit on mats and sofas", "a recipe for banana bread", "bread and butter",
                 "bananas are yellow"],
        "score": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],
        "rank": [0, 1, 2, 3, 0, 1, 2],
    })


def _expected(encoder, results, **kwargs):
    return {(row.qid, row.docno): s for qid, group in results.groupby("qid", sort=False)
            for row, s in zip(group.itertuples(), encoder.score(group["query"].iloc[0], group["text"].tolist(),
                                                                 **kwargs))}


def test_is_a_pyterrier_transformer_that_scores_and_ranks(encoder, results):
    reranker = SparseCrossEncoderReRanker(encoder)
    assert isinstance(reranker, pt.Transformer)
    pipeline = pt.Transformer.from_df(results) >> reranker
    out = pipeline(results[["qid", "query"]].drop_duplicates())
    assert list(out.columns[:4]) == ["qid", "query", "docno", "text"] and {"score", "rank"} <= set(out.columns)
    expected = _expected(encoder, results)
    assert_batch_close(out["score"], [expected[k] for k in zip(out.qid, out.docno)])
    assert out["qid"].tolist() == ["q1"] * 4 + ["q2"] * 3  # queries in input order
    for _, group in out.groupby("qid"):
        assert group["rank"].tolist() == list(range(len(group)))  # PyTerrier ranks from 0
        assert (np.diff(group["score"].to_numpy()) <= 0).all()
    # The first stage's score and rank are replaced, not kept beside the new ones.
    assert not out.set_index("docno")["score"].equals(results.set_index("docno")["score"].loc[out.docno])


def test_rank_cutoff_and_composition(encoder, results):
    reranker = SparseCrossEncoderReRanker(encoder)
    top2 = (pt.Transformer.from_df(results) >> reranker) % 2
    out = top2(results[["qid", "query"]].drop_duplicates())
    full = reranker(results)
    assert len(out) == 4
    for qid, group in out.groupby("qid"):
        assert group["docno"].tolist() == full[full.qid == qid]["docno"].tolist()[:2]
    # A re-ranker after a re-ranker (e.g. two models) composes too.
    twice = reranker >> SparseCrossEncoderReRanker(encoder)
    pd.testing.assert_frame_equal(twice(results), full)


def test_text_field_and_column_validation(encoder, results):
    body = results.rename(columns={"text": "body"})
    out = SparseCrossEncoderReRanker(encoder, text_field="body")(body)
    np.testing.assert_allclose(out["score"], SparseCrossEncoderReRanker(encoder)(results)["score"], rtol=1e-6)
    with pytest.raises(pt.validate.InputValidationError, match="text"):
        SparseCrossEncoderReRanker(encoder)(body)
    with pytest.raises(pt.validate.InputValidationError, match="query"):
        SparseCrossEncoderReRanker(encoder)(results.drop(columns=["query"]))
    with pytest.raises(ValueError, match="without query or 'text'.*d2"):
        SparseCrossEncoderReRanker(encoder)(results.assign(text=results["text"].where(results.docno != "d2")))


def test_empty_frame(encoder, results):
    out = SparseCrossEncoderReRanker(encoder)(results.iloc[:0])
    assert out.empty and {"qid", "docno", "text", "score", "rank"} <= set(out.columns)


def test_max_p_scores_long_documents_by_their_best_chunk(encoder):
    query = "where do cats sit"
    words = "stock markets fell the cat sat on mat dogs chase cats in park banana bread".split()
    rng = np.random.default_rng(0)
    # A long document (several chunks) whose best chunk is not its first, so MaxP and truncation differ.
    for _ in range(20):
        long_doc = " ".join(rng.choice(words, 150))
        maxp_score, = encoder.score_pairs([query], [long_doc], [0], max_p=True, progress=False)
        if abs(maxp_score - encoder.score(query, [long_doc])[0]) > 1e-3:
            break
    else:
        pytest.fail("no document whose MaxP score differs from its truncated score")
    frame = pd.DataFrame({"qid": ["q"] * 2, "query": [query] * 2, "docno": ["long", "short"],
                          "text": [long_doc, "cats sit"]})
    maxp = SparseCrossEncoderReRanker(encoder, max_p=True)(frame).set_index("docno")["score"]
    truncated = SparseCrossEncoderReRanker(encoder)(frame).set_index("docno")["score"]
    assert_batch_close(maxp["long"], maxp_score)
    assert_batch_close(truncated["long"], encoder.score(query, [long_doc])[0])
    assert_batch_close(maxp["short"], truncated["short"])


def test_one_qid_with_two_query_texts_is_an_error_naming_it(encoder, results):
    """Its rows would otherwise all be scored against the first row's query while the output shows their own."""
    changed = results.assign(query=results["query"].where(results.docno != "d3", "stock market news"))
    for rerank in (SparseCrossEncoderReRanker(encoder), lambda frame: encoder.rerank(frame, progress=False)):
        with pytest.raises(ValueError, match="qid 'q1' has 2 different query texts \\('where do cats sit', "
                                             "'stock market news'\\): each qid must have one query"):
            rerank(changed)


def test_a_missing_qid_or_docno_is_an_error_naming_the_column(encoder, results):
    for column in ("qid", "docno"):
        frame = results.assign(**{column: results[column].where(results.docno != "d6")})
        for rerank in (SparseCrossEncoderReRanker(encoder), lambda frame: encoder.rerank(frame, progress=False)):
            with pytest.raises(ValueError, match=f"column '{column}' is missing \\(NaN/None\\) in 1 rows, the first "
                                                 "at position 5"):
                rerank(frame)


def test_non_finite_scores_are_an_error_naming_the_model(nan_model_dir, results):
    from sce_jax.errors import NonFiniteScoresError

    reranker = SparseCrossEncoderReRanker(nan_model_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)
    with pytest.raises(NonFiniteScoresError, match=f"model '{nan_model_dir}' gave non-finite scores"):
        reranker(results)
