"""`SparseCrossEncoder.predict` and `.rank`: sentence-transformers' CrossEncoder argument names and return shapes."""

import inspect

import jax
import numpy as np
import pytest

from sce_jax.encoder import SparseCrossEncoder
from scores import assert_batch_close

QUERIES = ["where do cats sit", "banana bread recipe"]
DOCS = ["the cat sat on the mat", "a recipe for banana bread", "stock markets fell", "cats sit on sofas"]


@pytest.fixture(scope="module")
def encoder(tiny_sparse_dir):
    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=64, max_query_length=16)


def test_predict_returns_one_float32_score_per_pair_in_order(encoder):
    pairs = [(QUERIES[i % 2], doc) for i, doc in enumerate(DOCS)]
    scores = encoder.predict(pairs, batch_size=2)
    assert isinstance(scores, np.ndarray) and scores.shape == (4,) and scores.dtype == np.float32
    expected = [encoder.score(query, [doc])[0] for query, doc in pairs]
    assert_batch_close(scores, expected)  # each pair alone: other batches
    single = encoder.predict(["where do cats sit", DOCS[0]])  # one pair -> one score
    assert np.ndim(single) == 0
    assert_batch_close(single, expected[0])
    listed = encoder.predict(pairs, convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 4
    tensor = encoder.predict(pairs, convert_to_tensor=True)
    assert isinstance(tensor, jax.Array) and tensor.shape == (4,)
    sigmoid = encoder.predict(pairs, batch_size=2, activation_fn=lambda x: 1 / (1 + np.exp(-x)))  # same batches
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-scores)), rtol=1e-6)
    empty = encoder.predict([])
    assert empty.shape == (0,) and empty.dtype == np.float32


def test_predict_rejects_what_is_not_a_pair(encoder):
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        encoder.predict([("q", "d"), ("q", "d", "extra")])
    with pytest.raises(ValueError, match="prompt"):
        encoder.predict([("q", "d")], prompt="Instruct: ")


def test_rank_sorts_by_score_with_corpus_ids_top_k_and_texts(encoder):
    query = QUERIES[0]
    expected = encoder.score(query, DOCS)
    ranked = encoder.rank(query, DOCS)
    assert [r["corpus_id"] for r in ranked] == np.argsort(-expected, kind="stable").tolist()
    assert all(set(r) == {"corpus_id", "score"} and isinstance(r["score"], float) for r in ranked)
    assert_batch_close([r["score"] for r in ranked], np.sort(expected)[::-1])
    top = encoder.rank(query, DOCS, top_k=2, return_documents=True)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked[:2]]
    assert [r["text"] for r in top] == [DOCS[r["corpus_id"]] for r in top]
    # Equal scores keep input order (Python's stable sort in sentence-transformers).
    same = encoder.rank(query, ["same text", "same text", "same text"])
    assert [r["corpus_id"] for r in same] == [0, 1, 2]


def test_argument_names_and_order_follow_sentence_transformers():
    predict = list(inspect.signature(SparseCrossEncoder.predict).parameters)
    assert predict[:10] == ["self", "inputs", "prompt_name", "prompt", "batch_size", "show_progress_bar",
                            "activation_fn", "apply_softmax", "convert_to_numpy", "convert_to_tensor"]
    rank = list(inspect.signature(SparseCrossEncoder.rank).parameters)
    assert rank[:11] == ["self", "query", "documents", "top_k", "return_documents", "prompt_name", "prompt",
                         "batch_size", "show_progress_bar", "activation_fn", "apply_softmax"]


def test_a_string_where_a_list_of_documents_belongs_is_a_type_error(encoder):
    with pytest.raises(TypeError, match="docs must be a list of strings, got str 'honey'"):
        encoder.score("how do bees make honey", "honey")
    with pytest.raises(TypeError, match="documents must be a list of strings, got str 'abc'"):
        encoder.rank("how do bees make honey", "abc")
    with pytest.raises(TypeError, match="inputs must be a list of \\(query, document\\) pairs, got a string"):
        encoder.predict("honey")
    with pytest.raises(TypeError, match="docs must be a list of strings"):
        encoder.score_pairs(["q"], "ab", [0, 0])
    with pytest.raises(TypeError, match=r"docs\[1\] must be a string, got int"):
        encoder.score("q", ["a", 7])
    with pytest.raises(TypeError, match="query must be a string, got list"):
        encoder.score(["q"], ["a"])


def test_no_documents_give_an_empty_result(encoder):
    import pandas as pd

    for scores in (encoder.score("q", []), encoder.score_pairs(["q"], [], []), encoder.score_pairs([], [], [])):
        assert scores.shape == (0,) and scores.dtype == np.float32
    assert encoder.rank("q", []) == []
    frame = pd.DataFrame({"qid": [], "query": [], "docno": [], "text": []})
    ranked = encoder.rerank(frame)
    assert len(ranked) == 0 and {"score", "rank"} <= set(ranked.columns)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, "8", True])
def test_a_batch_size_that_is_no_positive_integer_is_a_settings_error(encoder, batch_size):
    from sce_jax.errors import SettingsError

    for call in (lambda: encoder.score("q", ["a"], batch_size=batch_size),
                 lambda: encoder.score("q", [], batch_size=batch_size),
                 lambda: encoder.predict([("q", "a")], batch_size=batch_size),
                 lambda: encoder.rank("q", ["a"], batch_size=batch_size)):
        with pytest.raises(SettingsError, match="batch_size must be a positive integer") as error:
            call()
        assert error.value.setting == "batch_size"


def test_non_finite_scores_are_an_error_naming_the_model_never_returned(nan_model_dir):
    from sce_jax.errors import InputError, NonFiniteScoresError

    model = SparseCrossEncoder.load(nan_model_dir, max_length=64, max_query_length=16)
    message = rf"model '{nan_model_dir}' gave non-finite scores \(NaN or infinity\) for 3 of 3 documents"
    for call in (lambda: model.score("q", DOCS[:3]), lambda: model.predict([("q", d) for d in DOCS[:3]]),
                 lambda: model.rank("q", DOCS[:3]), lambda: model.score_pairs(["q"], DOCS[:3], [0, 0, 0], max_p=True)):
        with pytest.raises(NonFiniteScoresError, match=message) as error:
            call()
        assert isinstance(error.value, InputError)  # exit status 2 from the commands


def test_sentence_transformers_evaluators_run_on_the_model(encoder, tmp_path):
    """sentence-transformers' own cross-encoder evaluators score with `predict` and then read `num_labels` and write
    to `model_card_data`: their metrics equal those computed here from `score`'s logits."""
    evaluation = pytest.importorskip(
        "sentence_transformers.cross_encoder.evaluation", reason="sentence-transformers (the test extra) is missing")
    from scipy.stats import pearsonr, spearmanr

    relevant = ((3, QUERIES[0]), (1, QUERIES[1]))
    samples = [{"query": q, "positive": [DOCS[i]], "documents": DOCS} for i, q in relevant]
    reranking = evaluation.CrossEncoderRerankingEvaluator(samples, name="r", batch_size=2)
    metrics = reranking(encoder, output_path=str(tmp_path))
    ranks = [1 + int(np.sum((scores := encoder.score(q, DOCS)) > scores[i])) for i, q in relevant]
    assert metrics["r_mrr@10"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert metrics["r_ndcg@10"] == pytest.approx(np.mean([1 / np.log2(1 + r) for r in ranks]))

    pairs = [(QUERIES[i % 2], doc) for i in range(2) for doc in DOCS]
    scores = np.array([encoder.score(q, [d])[0] for q, d in pairs], np.float64)
    labels = [1, 0, 0, 1, 0, 1, 0, 0]
    classification = evaluation.CrossEncoderClassificationEvaluator(pairs, labels, name="c")(encoder)
    best = max(np.mean((scores >= t) == np.array(labels, bool)) for t in scores)
    assert classification["c_accuracy"] == pytest.approx(best)
    gold = np.linspace(0, 1, len(pairs))
    correlation = evaluation.CrossEncoderCorrelationEvaluator(pairs, gold, name="x")(encoder)
    assert correlation["x_spearman"] == pytest.approx(spearmanr(gold, scores).statistic)
    assert correlation["x_pearson"] == pytest.approx(pearsonr(gold, scores).statistic, abs=1e-5)  # of logits
    stored = encoder.model_card_data.eval_results_dict
    assert reranking in stored and "r_ndcg@10" in stored[reranking] and "x_spearman" in next(reversed(stored.values()))
    assert encoder.num_labels == 1
