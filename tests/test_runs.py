"""Run files, text sources, ir_datasets access and evaluation (no model needed)."""

import gzip
import json
import logging
import math

import ir_measures
import numpy as np
import pandas as pd
import pytest

from sce_jax import irds
from sce_jax.evaluation import evaluate, needed_depth, parse_measures, read_qrels
from sce_jax.errors import InputError
from sce_jax.runs import (
    is_json_run,
    rank_by_score,
    read_json_run,
    read_trec_run,
    select_top,
    write_trec_run,
)
from sce_jax.errors import MissingTextError
from sce_jax.texts import complete_texts, read_docs, read_tsv_texts


def _write(path, text):
    path.write_text(text)
    return path


# --- TREC runs --------------------------------------------------------------------------------------------


def test_read_trec_run_5_and_6_columns_and_gz(tmp_path):
    text = "q1 Q0 d1 1 3.5 bm25\nq1 Q0 d2 2 2.25 bm25\n\nq2 0 d7 1 -1e3\n"
    plain = read_trec_run(_write(tmp_path / "a.run", text))
    with gzip.open(tmp_path / "a.run.gz", "wt") as f:
        f.write(text)
    packed = read_trec_run(tmp_path / "a.run.gz")
    for run in (plain, packed):
        assert run["qid"].tolist() == ["q1", "q1", "q2"]
        assert run["docno"].tolist() == ["d1", "d2", "d7"]
        assert run["rank"].tolist() == [1, 2, 1]
        assert run["score"].tolist() == [3.5, 2.25, -1000.0]


@pytest.mark.parametrize(
    "line, message",
    [
        ("q1 Q0 d2 2", "line 2: expected 5 or 6 whitespace-separated columns"),
        ("q1 Q0 d2 2 1.0 tag extra", "line 2: expected 5 or 6"),
        ("q1 Q0 d2 two 1.0 tag", "line 2: rank 'two' is not an integer"),
        ("q1 Q0 d2 2 high tag", "line 2: score 'high' is not a number"),
    ],
)
def test_trec_run_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.run", f"q1 Q0 d1 1 2.0 tag\n{line}\n")
    with pytest.raises(InputError, match=message) as error:
        read_trec_run(path)
    assert str(path) in str(error.value)


# --- JSON runs --------------------------------------------------------------------------------------------

RECORDS = [
    {"qid": "1", "query": "hubble achievements", "docno": "doc-3", "text": "Hubble found moons.", "rank": 1, "score": 10},
    {"query_id": 1, "query": "hubble achievements", "doc_id": "doc-4", "text": "Edwin Hubble.", "rank": 2, "score": 9.5},
    {"qid": "2", "query": "exit vim", "docno": "doc-1", "text": "Press ESC, then :wq."},
]


@pytest.mark.parametrize("layout", ["list", "jsonl", "jsonl.gz", "json.gz"])
def test_read_json_run_layouts_and_aliases(tmp_path, layout):
    text = json.dumps(RECORDS, indent=2) if layout.startswith("json.") or layout == "list" else "\n".join(
        json.dumps(r) for r in RECORDS)
    name = {"list": "run.json", "jsonl": "run.jsonl", "jsonl.gz": "run.jsonl.gz", "json.gz": "run.json.gz"}[layout]
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    assert is_json_run(path)
    run = read_json_run(path)
    assert run["qid"].tolist() == ["1", "1", "2"]
    assert run["docno"].tolist() == ["doc-3", "doc-4", "doc-1"]
    assert run["query"].tolist() == ["hubble achievements"] * 2 + ["exit vim"]
    assert run["text"].iloc[2] == "Press ESC, then :wq."
    np.testing.assert_array_equal(run["rank"], [1, 2, np.nan])
    np.testing.assert_array_equal(run["score"], [10, 9.5, np.nan])


def test_is_json_run_by_name():
    assert not is_json_run("msmarco-passage-trec-dl-2019-judged.run")
    assert not is_json_run("run.txt.gz")
    assert is_json_run("run.jsonl") and is_json_run("x.json.gz")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"qid": "1", "docno": "a", "rank": 1}\n{"qid": "1", "docno": "b", "rank": 2\n', "line 2: malformed JSON"),
        ('[\n{"qid": "1", "docno": "a"},\n{"qid": "1" "docno": "b"}\n]', "line 3: malformed JSON"),
        ('{"qid": "1", "docno": "a", "rank": "first"}\n', "line 1: rank 'first' is not an integer"),
        ('{"qid": "1", "docno": "a", "score": true}\n', "line 1: score True is not a number"),
        ('{"qid": "1", "docno": "a", "score": "x1"}\n', "line 1: score 'x1' is not a number"),
        ('{"qid": "1", "docno": "a"}\n{"qid": "1"}\n', "line 2: missing field 'docno' or 'doc_id'"),
        ('{"qid": "1", "docno": "a b"}\n', "line 1: docno 'a b' must be non-empty and contain no whitespace"),
        ('[{"qid": "1", "docno": "a"}, 5]', "item 1: expected a JSON object"),
        ('{"qid": "1", "docno": "a", "text": 7}\n', "line 1: text must be a string"),
    ],
)
def test_json_run_errors_name_file_and_place(tmp_path, content, message):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(InputError, match=message) as error:
        read_json_run(path)
    assert str(path) in str(error.value)


# --- depth cut, duplicates, ranking -----------------------------------------------------------------------


def _run(rows, columns=("qid", "docno", "rank", "score")):
    return pd.DataFrame(rows, columns=list(columns)).astype({"rank": float, "score": float})


def test_select_top_orders_by_rank_then_score_then_file_order():
    run = _run([
        ("q2", "x", 1, 1.0),
        ("q1", "c", 3, 9.0),
        ("q1", "a", 1, 1.0),
        ("q1", "b2", 2, 5.0),  # tie in rank 2: the higher score first
        ("q1", "b1", 2, 7.0),
        ("q1", "n1", None, 0.5),  # missing ranks: after ranked ones, by score
        ("q1", "n2", None, 0.7),
        ("q1", "z", None, None),
    ])
    top = select_top(run, None)
    assert top["qid"].tolist() == ["q2"] + ["q1"] * 7  # queries keep first-appearance order
    assert top["docno"].tolist() == ["x", "a", "b1", "b2", "c", "n2", "n1", "z"]
    assert select_top(run, 3)["docno"].tolist() == ["x", "a", "b1", "b2"]


def test_select_top_drops_repeated_pairs_with_a_warning(caplog):
    run = _run([("q1", "a", 2, 1.0), ("q1", "b", 1, 2.0), ("q1", "a", 1, 3.0), ("q2", "a", 1, 1.0)])
    with caplog.at_level(logging.WARNING):
        top = select_top(run, 10)
    assert list(zip(top["qid"], top["docno"], top["rank"])) == [("q1", "a", 1), ("q1", "b", 1), ("q2", "a", 1)]
    assert "dropped 1 repeated (qid, docno) pairs, e.g. (q1, a)" in caplog.text


def test_rank_by_score_breaks_ties_by_input_order():
    run = _run([("q1", "a", 0, 1.0), ("q1", "b", 0, 2.0), ("q1", "c", 0, 1.0), ("q0", "d", 0, 0.0)])
    ranked = rank_by_score(run, first_rank=1)
    assert list(zip(ranked["docno"], ranked["rank"])) == [("b", 1), ("a", 2), ("c", 3), ("d", 1)]


def test_write_trec_run_format_and_float32_precision(tmp_path):
    scores = np.float32([0.1, 1 / 3, -2.5e-7, 12345.678])
    run = pd.DataFrame({"qid": ["7", "7", "7", "8"], "docno": ["a", "b", "c", "d"], "score": scores.astype(float)})
    path = tmp_path / "out.run"
    write_trec_run(path, run, "mytag")
    lines = [line.split() for line in path.read_text().splitlines()]
    assert [fields[:4] for fields in lines] == [["7", "Q0", "b", "1"], ["7", "Q0", "a", "2"], ["7", "Q0", "c", "3"],
                                                ["8", "Q0", "d", "1"]]
    assert all(fields[5] == "mytag" and len(fields) == 6 for fields in lines)
    written = {fields[2]: np.float32(fields[4]) for fields in lines}
    assert [written[d] for d in "abcd"] == scores.tolist()  # bit-exact round trip
    assert read_trec_run(path)["docno"].tolist() == ["b", "a", "c", "d"]


def test_failed_write_leaves_existing_file_and_no_temporary(tmp_path):
    path = _write(tmp_path / "out.run", "old contents\n")
    run = pd.DataFrame({"qid": ["1"], "docno": ["a"], "score": [object()]})  # unprintable as float32
    with pytest.raises(TypeError):
        write_trec_run(path, run, "tag")
    with pytest.raises(InputError, match="run tag"):
        write_trec_run(path, run.assign(score=1.0), "two words")
    assert path.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.run"]


# --- texts ------------------------------------------------------------------------------------------------


def test_local_text_files(tmp_path):
    queries = read_tsv_texts(_write(tmp_path / "q.tsv", "q1\twhere do cats sit\n\nq2\tbanana\tbread\n"))
    assert queries == {"q1": "where do cats sit", "q2": "banana bread"}
    docs = read_docs(_write(tmp_path / "d.jsonl", '{"docno": "d1", "text": "one"}\n{"doc_id": 2, "text": "two"}\n'))
    assert docs == {"d1": "one", "2": "two"}
    with pytest.raises(InputError, match=r"q\.tsv: line 2: expected an id, a tab, then the text"):
        read_tsv_texts(_write(tmp_path / "q.tsv", "q1\tok\nq2 no tab\n"))
    with pytest.raises(InputError, match=r"line 1: expected an object with \"docno\""):
        read_docs(_write(tmp_path / "d.jsonl", '{"docno": "d1"}\n'))


def test_complete_texts_keeps_run_texts_fills_from_files_and_names_missing_ids(tmp_path):
    run = pd.DataFrame({"qid": ["q1", "q1", "q2"], "docno": ["d1", "d2", "d3"], "rank": 1.0, "score": 1.0,
                        "text": ["own text", None, None]})
    queries = _write(tmp_path / "q.tsv", "q1\tquery one\nq2\tquery two\n")
    docs = _write(tmp_path / "d.tsv", "d1\tfile text\nd2\ttwo\nd3\tthree\n")
    done = complete_texts(run, source="r", queries_file=queries, docs_file=docs)
    assert done["query"].tolist() == ["query one", "query one", "query two"]
    assert done["text"].tolist() == ["own text", "two", "three"]

    with pytest.raises(MissingTextError, match=r"r: no text for 2 documents \(docno d2, d3\)"):
        complete_texts(run, source="r", queries_file=queries)
    with pytest.raises(MissingTextError, match=r"no text for 1 queries \(qid q2\)"):
        complete_texts(run, source="r", queries_file=_write(tmp_path / "q1.tsv", "q1\tx\n"), docs_file=docs)


# --- ir_datasets ------------------------------------------------------------------------------------------


def test_infer_dataset_id_from_file_name():
    assert irds.infer_dataset_id("/x/msmarco-passage-trec-dl-2019-judged.run") == "msmarco-passage/trec-dl-2019/judged"
    assert irds.infer_dataset_id("msmarco-document-trec-dl-2019-judged.run.gz") == "msmarco-document/trec-dl-2019/judged"
    assert irds.infer_dataset_id("msmarco-passage-trec-dl-2019-judged__bm25__.run") == "msmarco-passage/trec-dl-2019/judged"
    assert irds.infer_dataset_id("my-own-run.txt") is None


def test_unknown_dataset_id():
    with pytest.raises(irds.UnknownDatasetError, match="unknown ir_datasets id 'no-such/dataset'"):
        irds.load_dataset("no-such/dataset")


def test_texts_runs_and_qrels_from_a_local_ir_dataset(local_ir_dataset):
    dataset_id, _ = local_ir_dataset
    run = irds.dataset_run(dataset_id)
    assert list(zip(run["qid"], run["docno"], run["score"])) == [
        ("q1", "d3", 3.0), ("q1", "d1", 2.0), ("q1", "d2", 1.0), ("q2", "d4", 5.0), ("q2", "d3", 4.0)]
    done = complete_texts(run, source=dataset_id, dataset_id=dataset_id)
    assert done.loc[done.docno == "d4", "text"].item() == "a recipe for banana bread"
    assert done.loc[done.qid == "q2", "query"].unique().tolist() == ["banana bread recipe"]
    qrels = irds.dataset_qrels(dataset_id)
    assert sorted(map(tuple, qrels.to_numpy().tolist())) == [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d4", 1)]
    missing = run.assign(docno=["d1", "d404", "d2", "d4", "d3"])
    with pytest.raises(MissingTextError, match="docno d404"):
        complete_texts(missing, source="x", dataset_id=dataset_id)


# --- evaluation -------------------------------------------------------------------------------------------


def test_evaluation_matches_hand_computed_values(tmp_path):
    qrels = read_qrels(_write(tmp_path / "qrels", "q1 0 d1 2\nq1 0 d2 1\nq1 0 d3 0\nq2 0 e2 1\n"))
    run = pd.DataFrame({"qid": ["q1"] * 3 + ["q2"] * 3, "docno": ["d3", "d1", "d2", "e1", "e3", "e2"],
                        "score": [3.0, 2.0, 1.0, 3.0, 2.0, 1.0]})
    results = evaluate(qrels, {"run": run}, parse_measures(["nDCG@10", "RR@10", "P@2"]))
    # q1: gains 0, 2, 1 at ranks 1..3; ideal 2, 1. q2: the relevant document at rank 3.
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    ndcg_q2 = (1 / math.log2(4)) / 1
    assert results["nDCG@10"]["run"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-12)
    assert results["RR@10"]["run"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-12)
    assert results["P@2"]["run"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-12)


def test_evaluation_in_pieces_of_whole_queries_equals_the_whole_run(tmp_path):
    """A CompactRun's `frames` (pieces of whole queries, as the re-ranker evaluates 7M-row runs) give the same
    means as the whole frame, for measures of different depths."""
    from sce_jax.runs import compact_from_frame

    rng = np.random.default_rng(3)
    rows, qrels_lines = [], []
    for q in range(40):
        for d in range(int(rng.integers(1, 30))):
            rows.append((f"q{q}", f"d{d}", float(np.round(rng.normal(), 1))))  # many ties
            if rng.random() < 0.3:
                qrels_lines.append(f"q{q} 0 d{d} {rng.integers(0, 3)}\n")
    qrels_lines.append("q99 0 x 1\n")  # a query the run lacks counts as an empty ranking, once
    qrels = read_qrels(_write(tmp_path / "qrels", "".join(qrels_lines)))
    frame = pd.DataFrame(rows, columns=["qid", "docno", "score"])
    run = compact_from_frame(frame.assign(rank=frame.groupby("qid").cumcount() + 1), None)
    pieces = list(run.frames(rows=50))
    assert len(pieces) > 5 and sum(len(p) for p in pieces) == len(run)
    assert all(not set(a.qid) & set(b.qid) for a, b in zip(pieces, pieces[1:]))  # no query split
    measures = parse_measures(["nDCG@10", "RR@10", "AP", "R@5"])
    whole = evaluate(qrels, {"run": run.frame()}, measures)
    qrels_df = qrels.assign(query_id=qrels.query_id.astype(str))
    direct = ir_measures.calc_aggregate(measures, qrels_df, run.frame().rename(
        columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]])
    assert {str(m): v for m, v in direct.items()} == pytest.approx({k: v["run"] for k, v in whole.items()}, abs=1e-12)
    chunked = evaluate(qrels, {"run": run.frames(rows=50)}, measures)
    for name in whole:
        assert chunked[name]["run"] == pytest.approx(whole[name]["run"], abs=1e-12)
    assert 0 < whole["nDCG@10"]["run"] < 1
    # Measures that all have a cutoff read only each query's top rows (ties at the cutoff kept): same numbers.
    cut = parse_measures(["nDCG@3", "RR@3", "P@2", "R@4"])
    assert needed_depth(cut) == 4 and needed_depth(measures) is None
    assert needed_depth(parse_measures(["nDCG(judged_only=True)@10"])) is None
    direct = ir_measures.calc_aggregate(cut, qrels_df, run.frame().rename(
        columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]])
    pruned = evaluate(qrels, {"run": run.frames(rows=50)}, cut)
    assert {str(m): v for m, v in direct.items()} == pytest.approx({k: v["run"] for k, v in pruned.items()}, abs=1e-12)
    # Six documents tied at the cutoff, in both file orders, either end relevant: whichever ir_measures ranks
    # first among them must survive the pruning.
    for relevant in ("d0", "d5"):
        for order in (range(6), range(5, -1, -1)):
            tied_qrels = read_qrels(_write(tmp_path / "tied", f"t 0 {relevant} 1\n"))
            tied = pd.DataFrame({"qid": ["t"] * 6, "docno": [f"d{i}" for i in order], "score": [1.0] * 6})
            expected = ir_measures.calc_aggregate(parse_measures(["RR@1", "P@1"]), tied_qrels,
                                                  tied.rename(columns={"qid": "query_id", "docno": "doc_id"}))
            found = evaluate(tied_qrels, {"run": tied}, parse_measures(["RR@1", "P@1"]))
            assert {str(m): v for m, v in expected.items()} == {k: v["run"] for k, v in found.items()}


def test_evaluation_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown ir_measures measure 'nDCG@@10'"):
        parse_measures(["nDCG@@10"])
    with pytest.raises(InputError, match=r"qrels: line 2: expected 4 columns"):
        read_qrels(_write(tmp_path / "qrels", "q1 0 d1 1\nq1 d2 1\n"))
    with pytest.raises(InputError, match=r"qrels: line 1: relevance 'yes' is not an integer"):
        read_qrels(_write(tmp_path / "qrels", "q1 0 d1 yes\n"))


# --- compact runs: depth cut while reading ---------------------------------------------------------------------


def _random_run_lines(rng, n):
    lines = []
    for _ in range(n):
        score = rng.choice(["0.5", "1.5", "-2", "3e2", "7"])
        lines.append(f"q{rng.integers(0, 4)}\tQ0  d{rng.integers(0, 8)} {rng.integers(1, 4)} {score}"
                     + rng.choice(["", " tag"]) + rng.choice(["\n", "\r\n", "\n\n"]))
    return lines


@pytest.mark.parametrize("seed", range(20))
def test_compact_reader_equals_read_then_select_top(tmp_path, seed, monkeypatch):
    from sce_jax import runs
    from sce_jax.runs import DepthCut, read_trec_run_compact

    rng = np.random.default_rng(seed)
    lines = _random_run_lines(rng, int(rng.integers(1, 80)))
    if seed % 4 == 0:
        lines.insert(int(rng.integers(0, len(lines))), "q9 Q0 dx 2 nan\n")  # NaN score: the line parser's block
    path = _write(tmp_path / "r.run", "".join(lines))
    depth = [None, 1, 2, 5][seed % 4]
    # Small blocks and prunes, so that both readers and the pruning run several times.
    monkeypatch.setattr(runs, "_blocks", lambda p, size=64, real=runs._blocks: real(p, size))
    monkeypatch.setattr(runs, "DepthCut", lambda d: DepthCut(d, chunk_rows=3))
    if seed % 3 == 0:  # every docno hash collides: repeats are still decided by the ids themselves
        monkeypatch.setattr(runs, "hash_fixed", lambda ids: np.zeros(len(ids), np.uint64))
    got = read_trec_run_compact(path, depth).frame()
    expected = select_top(read_trec_run(path), depth)
    assert list(zip(got.qid, got.docno)) == list(zip(expected.qid, expected.docno))
    np.testing.assert_array_equal(got["rank"].to_numpy(), expected["rank"].to_numpy())
    np.testing.assert_array_equal(got["score"].to_numpy(), expected["score"].to_numpy())


def test_compact_reader_errors_name_the_line_and_bom_is_stripped(tmp_path):
    from sce_jax.runs import read_trec_run_compact

    run = read_trec_run_compact(_write(tmp_path / "r.run", "\ufeff101 Q0 a 1 2.0 x\n101 Q0 b 2 1.0 x\n"), None)
    assert run.qids == ["101"] and run.docnos(0, 2) == ["a", "b"]
    lines = "".join(f"q Q0 d{i} {i + 1} 1.0 x\n" for i in range(50))
    for bad, message in (("q Q0 z 3.5 1.0 x", "line 51: rank '3.5' is not an integer"),
                         ("q Q0 z 3 1.0 x y", "line 51: expected 5 or 6"),
                         ("q Q0 z 3", "line 51: expected 5 or 6"),
                         ("q Q0 z 3 high x", "line 51: score 'high' is not a number")):
        with pytest.raises(InputError, match=message):
            read_trec_run_compact(_write(tmp_path / "r.run", lines + bad + "\n"), None)


def test_json_ids_strings_or_integers(tmp_path):
    run = read_json_run(_write(tmp_path / "r.jsonl", '{"qid": 101, "docno": "a"}\n{"qid": "102", "docno": 7}\n'))
    assert run.qid.tolist() == ["101", "102"] and run.docno.tolist() == ["a", "7"]


def test_compact_reader_keeps_ids_as_written(tmp_path):
    from sce_jax.runs import read_trec_run_compact

    run = read_trec_run_compact(_write(tmp_path / "r.run", "0101 Q0 007 1 2.0 x\n1e3 Q0 1.0 1 1 x\n"), None)
    assert run.qids == ["0101", "1e3"] and run.docnos(0, 2) == ["007", "1.0"]
