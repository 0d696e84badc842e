"""Re-ranking: the CLI end to end on each input kind, MaxP, devices, the PyTerrier entry point, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sce_jax.errors import run_cli
from sce_jax.rerank import RerankConfig, load_config, load_input
from sce_jax.rerank import main as rerank_main
from sce_jax.errors import InputError
from sce_jax.runs import read_json_run
from scores import assert_batch_close

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RUN = REPO / "examples" / "run.jsonl"
EXAMPLE_QRELS = REPO / "examples" / "qrels.txt"
MAX_LENGTH = 64
MAX_QUERY_LENGTH = 16


def main(argv) -> int:
    return run_cli(rerank_main, argv)


def _cli(*args) -> int:
    return main([*map(str, args), "--max-length", str(MAX_LENGTH), "--max-query-length", str(MAX_QUERY_LENGTH),
                 "--batch-size", "8"])


def _read_output(path) -> pd.DataFrame:
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    assert all(len(row) == 6 for row in rows)
    return pd.DataFrame(rows, columns=["qid", "q0", "docno", "rank", "score", "tag"]).astype(
        {"rank": int, "score": np.float32})


def _check_ranking(output: pd.DataFrame, expected_pairs: set) -> None:
    """Ranks 1..n per query follow descending scores; every expected (qid, docno) appears exactly once."""
    assert len(output) == len(expected_pairs) == len(set(zip(output.qid, output.docno)))
    assert set(zip(output.qid, output.docno)) == expected_pairs
    for _, group in output.groupby("qid"):
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert (np.diff(group["score"].to_numpy()) <= 0).all()


def _ndcg_at_10(ranked_docnos, gains):
    dcg = sum(gains.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked_docnos[:10]))
    ideal = sorted(gains.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


@pytest.fixture(scope="module")
def sparse_encoder(tiny_sparse_dir):
    from sce_jax.encoder import SparseCrossEncoder

    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)


def _torch_scores(model_dir, queries, docs):
    """Reference logits from Hugging Face BERT on the original layout [CLS] q [SEP] [SEP] d [SEP] [SEP]."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    scores = []
    for query, doc in zip(queries, docs):
        q = tokenizer(query, add_special_tokens=False)["input_ids"][: MAX_QUERY_LENGTH - 2] + [102, 102]
        d = tokenizer(doc, add_special_tokens=False)["input_ids"][: MAX_LENGTH - 1 - len(q) - 2] + [102, 102]
        ids = torch.tensor([[101] + q + d])
        types = torch.tensor([[0] * (1 + len(q)) + [1] * len(d)])
        with torch.no_grad():
            scores.append(model(input_ids=ids, token_type_ids=types).logits[0, 0].item())
    return np.array(scores, np.float32)


def test_json_run_end_to_end_matches_torch_and_evaluates(tiny_hf_dir, tmp_path, caplog):
    output = tmp_path / "reranked.run"
    assert _cli("--model", tiny_hf_dir, "--run", EXAMPLE_RUN, "--output", output, "--qrels", EXAMPLE_QRELS,
                "--depth", 0, "--run-tag", "tiny") == 0
    run = read_json_run(EXAMPLE_RUN)
    result = _read_output(output)
    _check_ranking(result, set(zip(run.qid, run.docno)))
    assert set(result.tag) == {"tiny"}
    assert "distinct batch shapes were compiled" in caplog.text

    # The full-attention tiny model is a plain BERT cross-encoder: torch gives the reference scores.
    merged = run.merge(result, on=["qid", "docno"])
    np.testing.assert_allclose(merged.score_y, _torch_scores(tiny_hf_dir, merged["query"], merged["text"]),
                               atol=2e-5, rtol=1e-4)

    qrels = pd.read_csv(EXAMPLE_QRELS, sep=" ", names=["qid", "it", "docno", "rel"], dtype={"qid": str})
    gains = {qid: dict(zip(g.docno, g.rel)) for qid, g in qrels.groupby("qid")}
    expected = {
        "input": np.mean([_ndcg_at_10(g.docno.tolist(), gains[q]) for q, g in run.groupby("qid")]),
        "reranked": np.mean([_ndcg_at_10(g.docno.tolist(), gains[q]) for q, g in result.groupby("qid")]),
    }
    saved = json.loads(Path(f"{output}.eval.json").read_text())
    assert saved["nDCG@10"] == pytest.approx(expected, abs=1e-6)
    assert set(saved) == {"nDCG@10", "RR@10"}


def test_trec_run_with_local_texts_depth_and_duplicates(sparse_encoder, tiny_sparse_dir, tmp_path, caplog):
    run_file = tmp_path / "first-stage.run"
    run_file.write_text(
        "q1 Q0 d1 1 9 bm25\nq1 Q0 d2 2 8 bm25\nq1 Q0 d1 3 7 bm25\nq1 Q0 d3 3 7 bm25\nq1 Q0 d4 4 6 bm25\n"
        "q2 Q0 d3 2 5 bm25\nq2 Q0 d4 1 6 bm25\n"
    )
    (tmp_path / "queries.tsv").write_text("q1\twhere do cats sit\nq2\tbanana bread recipe\n")
    docs = {"d1": "the cat sat on the mat", "d2": "dogs chase cats in the park",
            "d3": "stock markets fell sharply today", "d4": "a recipe for banana bread with walnuts"}
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"docno": k, "text": v}) + "\n" for k, v in docs.items()))
    output = tmp_path / "out.run"
    assert _cli("--model", tiny_sparse_dir, "--run", run_file, "--output", output, "--depth", 3,
                "--queries", tmp_path / "queries.tsv", "--docs", tmp_path / "docs.jsonl") == 0
    assert "dropped 1 repeated (qid, docno) pairs, e.g. (q1, d1)" in caplog.text
    result = _read_output(output)
    _check_ranking(result, {("q1", "d1"), ("q1", "d2"), ("q1", "d3"), ("q2", "d3"), ("q2", "d4")})
    for qid, query in (("q1", "where do cats sit"), ("q2", "banana bread recipe")):
        group = result[result.qid == qid]
        expected = sparse_encoder.score(query, [docs[d] for d in group.docno])
        assert_batch_close(group.score, expected)


def test_ir_dataset_id_as_input_with_its_qrels(local_ir_dataset, tiny_sparse_dir, tmp_path):
    dataset_id, _ = local_ir_dataset
    output = tmp_path / "out.run"
    assert _cli("--model", tiny_sparse_dir, "--run", dataset_id, "--output", output) == 0
    _check_ranking(_read_output(output), {("q1", "d3"), ("q1", "d1"), ("q1", "d2"), ("q2", "d4"), ("q2", "d3")})
    saved = json.loads(Path(f"{output}.eval.json").read_text())
    # First-stage order by score: q1 d3 (0), d1 (2), d2 (1); q2 d4 (1), d3.
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert saved["nDCG@10"]["input"] == pytest.approx((ndcg_q1 + 1) / 2, abs=1e-9)
    assert saved["RR@10"]["input"] == pytest.approx((1 / 2 + 1) / 2, abs=1e-9)


def test_trec_run_texts_from_the_dataset_its_name_gives(local_ir_dataset, tmp_path):
    dataset_id, directory = local_ir_dataset
    run_file = tmp_path / (dataset_id.replace("/", "-") + ".run")
    run_file.write_text((directory / "scoreddocs").read_text())
    run, texts, inferred, _ = load_input(RerankConfig(run=str(run_file), output="x", depth=2))
    assert inferred == dataset_id
    frame = run.frame()
    assert list(zip(frame.qid, frame.docno)) == [("q1", "d3"), ("q1", "d1"), ("q2", "d4"), ("q2", "d3")]
    assert texts.docs(0, 2) == ["stock markets fell sharply today", "the cat sat on the mat"]
    assert texts.queries == ["where do cats sit", "banana bread recipe"]


def test_maxp_chunk_starts_cover_the_document():
    from sce_jax.encoder import maxp_chunk_starts

    assert list(maxp_chunk_starts(1000, 500)) == [0, 250, 500]
    assert list(maxp_chunk_starts(1001, 500)) == [0, 250, 500, 750]
    assert list(maxp_chunk_starts(500, 500)) == [0]
    assert list(maxp_chunk_starts(3, 500)) == [0]
    assert list(maxp_chunk_starts(7, 4)) == [0, 2, 4]


def test_pack_documents_first_fit_decreasing_per_query():
    from sce_jax.batch import length_buckets
    from sce_jax.encoder import Row, pack_documents

    buckets = length_buckets(512, step=16)  # ..., 240, 304, 384, 480, 512
    lengths = np.array([100, 200, 50, 150, 400, 10, 10, 10])
    doc_query = np.array([0, 0, 0, 0, 1, 2, 2, 2])
    # Query 0 (rows of 304, the bucket of 256): 200 opens a row, 150 a second, 100 joins the first (104 free),
    # 50 the second. Query 1: its 400-token document sets rows of 480. Query 2: two slots per row.
    assert pack_documents(lengths, doc_query, buckets, max_slots=2) == [
        Row(304, 0, [1, 0]), Row(304, 0, [3, 2]), Row(304, 2, [5, 6]), Row(304, 2, [7]), Row(480, 1, [4])
    ]
    # One document per row: each padded to its own length bucket.
    assert pack_documents(lengths[:3], doc_query[:3], buckets, max_slots=1) == [
        Row(64, 0, [2]), Row(112, 0, [0]), Row(240, 0, [1])
    ]


def test_packed_rows_score_like_one_document_per_row(sparse_encoder, monkeypatch):
    import sce_jax.encoder

    rng = np.random.default_rng(0)
    words = "telescope mirror lens star galaxy orbit light planet moon comet".split()
    queries = ["history of the telescope", "moons of pluto", "what is a comet"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(25)]
    doc_query = rng.integers(0, 3, len(docs))
    shapes_before = set(sparse_encoder.compiled_shapes)
    packed = sparse_encoder.score_pairs(queries, docs, doc_query, batch_size=4, progress=False)
    assert any(shape[3][1] > 1 for shape in sparse_encoder.compiled_shapes - shapes_before)  # really packed
    monkeypatch.setattr(sce_jax.encoder, "PACKED_SLOTS", 1)
    alone = sparse_encoder.score_pairs(queries, docs, doc_query, batch_size=4, progress=False)
    assert_batch_close(packed, alone)


def test_maxp_scores_the_best_half_overlapping_chunk(sparse_encoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sparse_encoder.source)
    query = "history of the telescope"
    long_doc = " ".join(f"word{i} lens mirror star" for i in range(30))
    short_doc = "galileo improved the telescope"
    q = tokenizer(query, add_special_tokens=False)["input_ids"] + [102, 102]
    pieces = tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    size = MAX_LENGTH - 1 - len(q) - 2
    assert len(pieces) > 2 * size  # several chunks
    starts = list(range(0, len(pieces) - size + size // 2, size // 2))
    if starts[-1] + size < len(pieces):
        starts.append(starts[-1] + size // 2)
    chunks = [pieces[s : s + size] + [102, 102] for s in starts]
    chunk_scores = sparse_encoder.score_tokens([q], chunks, [0] * len(chunks), progress=False)

    maxp = sparse_encoder.score_pairs([query], [long_doc, short_doc], [0, 0], max_p=True, progress=False)
    truncated = sparse_encoder.score_pairs([query], [long_doc, short_doc], [0, 0], progress=False)
    assert_batch_close(maxp[0], chunk_scores.max())  # other batches (with the short document's chunk)
    assert_batch_close(truncated[0], chunk_scores[0])  # truncation keeps the first chunk
    assert chunk_scores.argmax() != 0  # so MaxP changed the score
    assert_batch_close(maxp[1], truncated[1])  # a short document is one chunk (other batch shape)


def test_rerank_frame_for_pyterrier(sparse_encoder):
    frame = pd.DataFrame({
        "qid": ["b", "b", "b", "a", "a"],
        "query": ["cats"] * 3 + ["bread"] * 2,
        "docno": ["1", "2", "3", "4", "5"],
        "text": ["a cat on a mat", "stock markets", "cats chase mice", "bread recipe", "a car engine"],
        "extra": range(5),
    })
    result = sparse_encoder.rerank(frame, progress=False)
    assert list(result.qid) == ["b", "b", "b", "a", "a"]
    assert list(result["rank"]) == [0, 1, 2, 0, 1]  # PyTerrier numbers ranks from 0
    for qid, group in result.groupby("qid"):
        assert (np.diff(group.score) <= 0).all()
        rows = frame[frame.qid == qid]
        expected = dict(zip(rows.docno, sparse_encoder.score(rows["query"].iloc[0], rows.text.tolist())))
        assert_batch_close(group.score, [expected[d] for d in group.docno])
    assert dict(zip(result.docno, result.extra)) == dict(zip(frame.docno, frame.extra))


def test_one_and_two_devices_write_identical_runs(tiny_sparse_dir, tmp_path):
    script = (
        "import sys, jax\n"
        "from sce_jax.errors import run_cli\n"
        "from sce_jax.rerank import main as rerank_main\n"
        "main = lambda argv: run_cli(rerank_main, argv)\n"
        "assert jax.local_device_count() == 2\n"
        "for n in (1, 2):\n"
        f"    code = main(['--model', {str(tiny_sparse_dir)!r}, '--run', {str(EXAMPLE_RUN)!r}, '--devices', str(n),\n"
        f"                 '--output', {str(tmp_path)!r} + f'/{{n}}.run', '--max-length', '{MAX_LENGTH}',\n"
        "                 '--batch-size', '4'])\n"
        "    assert code == 0, code\n"
        f"sys.exit(main(['--model', {str(tiny_sparse_dir)!r}, '--run', {str(EXAMPLE_RUN)!r}, '--devices', '3',\n"
        f"               '--output', {str(tmp_path)!r} + '/3.run', '--max-length', '{MAX_LENGTH}']))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "error: --devices 3, but this machine has 2 local devices" in done.stderr
    one, two = (tmp_path / "1.run").read_bytes(), (tmp_path / "2.run").read_bytes()
    assert one == two
    assert len(one.splitlines()) == 40
    assert not (tmp_path / "3.run").exists()


def test_config_file_then_flags():
    defaults = load_config(str(REPO / "configs" / "rerank.yaml"), {"run": "r", "output": "o"})
    assert defaults == RerankConfig(run="r", output="o")  # the documented file matches the dataclass
    assert (defaults.depth, defaults.max_length, defaults.max_query_length) == (100, None, 32)


def test_flags_override_the_config_file(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("depth: 5\nbatch_size: 8\nmeasures: [AP]\nrun: from-yaml\n")
    config = load_config(str(config_file), {"depth": 3, "output": "o"})
    assert (config.depth, config.batch_size, config.measures, config.run, config.output) == (3, 8, ["AP"], "from-yaml", "o")


BAD_INPUTS = {
    "malformed JSON": ("run.jsonl", '{"qid": "1", "docno": "a", "query": "q", "text": "t"}\n{"qid": "1", "docno"\n',
                       [], "run.jsonl: line 2: malformed JSON"),
    "wrong column count": ("run.trec", "1 Q0 a 1 2.0 x\n1 Q0 b 2\n", [], "run.trec: line 2: expected 5 or 6"),
    "non-numeric rank": ("run.trec", "1 Q0 a one 2.0 x\n", [], "run.trec: line 1: rank 'one' is not an integer"),
    "non-numeric score": ("run.trec", "1 Q0 a 1 2.0 x\n1 Q0 b 2 NaNish x\n", [],
                          "run.trec: line 2: score 'NaNish' is not a number"),
    "documents without text": ("run.trec", "1 Q0 a 1 2.0 x\n1 Q0 b 2 1.0 x\n1 Q0 c 3 0.5 x\n",
                               ["--queries", "queries.tsv", "--docs", "docs.tsv"],
                               "no text for 2 documents (docno b, c)"),
    "queries without text": ("run.trec", "1 Q0 a 1 2.0 x\n7 Q0 a 1 1.0 x\n", ["--queries", "queries.tsv", "--docs",
                             "docs.tsv"], "no text for 1 queries (qid 7)"),
    "unknown dataset": ("run.trec", "1 Q0 a 1 2.0 x\n", ["--dataset", "no-such/dataset"],
                        "unknown ir_datasets id 'no-such/dataset'"),
    "unknown run id": (None, None, [], "run 'no-such/dataset' is neither a file nor a known ir_datasets id"),
    "no texts and no dataset": ("run.trec", "1 Q0 a 1 2.0 x\n", [], "no text for 1 queries (qid 1)"),
    "unknown measure": ("run.jsonl", '{"qid": "1", "docno": "a", "query": "q", "text": "t"}\n',
                        ["--measures", "nDCG@10", "MAPP"], "unknown ir_measures measure 'MAPP'"),
    "unknown config key": ("run.jsonl", '{"qid": "1", "docno": "a", "query": "q", "text": "t"}\n',
                           ["--config", "config.yaml"], "config.yaml: unknown settings windw"),
    "missing model": ("run.jsonl", '{"qid": "1", "docno": "a", "query": "q", "text": "t"}\n',
                      ["--model", "./no/such/model"], "model './no/such/model' not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_message_and_keeps_the_output(case, tmp_path, capsys, monkeypatch):
    name, content, extra, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    Path("queries.tsv").write_text("1\tsome query\n")
    Path("docs.tsv").write_text("a\tsome text\n")
    Path("config.yaml").write_text("windw: 3\n")
    if name is not None:
        Path(name).write_text(content)
    Path("out.run").write_text("previous run\n")
    model = [] if "--model" in extra else ["--model", "./model-not-needed"]
    assert main(["--run", name or "no-such/dataset", "--output", "out.run", *model, *extra]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert Path("out.run").read_text() == "previous run\n"
    assert not list(tmp_path.glob(".out.run*"))


@pytest.mark.parametrize("line, message", [
    ("depth: ten\n", "depth must be int, got 'ten'"),
    ("max_p: 1\n", "max_p must be bool, got 1"),
    ("measures: nDCG@10\n", "measures must be list, got 'nDCG@10'"),
    ("- depth\n", "expected a mapping of settings"),
])
def test_config_file_type_errors(tmp_path, line, message):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(line)
    with pytest.raises(InputError, match=message):
        load_config(str(config_file), {"run": "r", "output": "o"})


def test_non_finite_scores_exit_2_naming_the_model_and_nothing_is_written(nan_model_dir, tmp_path, capsys):
    output = tmp_path / "out.run"
    assert _cli("--model", nan_model_dir, "--run", EXAMPLE_RUN, "--output", output, "--qrels", EXAMPLE_QRELS,
                "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: model '{nan_model_dir}' gave non-finite scores (NaN or infinity) for ")
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, evaluation, progress or lock file
