"""The HTTP server: both endpoints against offline `score`, dynamic batching, every error class, readiness,
backpressure, shutdown with requests in flight, and the command line's errors. Servers listen on 127.0.0.1 only."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sce_jax.errors import run_cli  # noqa: E402
from sce_jax.serve import (  # noqa: E402
    Batcher, QueueFull, ServeSettings, create_app, main, ranked_order, sigmoid, take_group, validation_message,
)
from scores import assert_batch_close  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64
MAX_QUERY_LENGTH = 16
WORDS = ("cat dog bank river money stock market fell rose sharply the a of in on sat mat park chase bread banana "
         "recipe bees honey nectar wasps nests city people live population museum").split()


def _texts(rng, count, low=3, high=40):
    return [" ".join(rng.choice(WORDS, rng.integers(low, high))) for _ in range(count)]


class InProcessServer:
    """uvicorn in a thread on an ephemeral 127.0.0.1 port."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


class Spy:
    """The encoder, recording how many requests (queries) each scoring call served."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.compiled_shapes = encoder.compiled_shapes
        self.group_sizes = []

    def score_pairs(self, queries, *args, **kwargs):
        self.group_sizes.append(len(queries))
        return self.encoder.score_pairs(queries, *args, **kwargs)


class StubEncoder:
    """Scores a document by its length in characters; scoring waits for `gate`."""

    def __init__(self):
        self.gate = threading.Event()
        self.tokenizer = SimpleNamespace(max_length=MAX_LENGTH)
        self.compiled_shapes = set()

    def score_pairs(self, queries, docs, doc_query, **kwargs):
        assert self.gate.wait(60)
        return np.array([len(doc) for doc in docs], np.float32)


@pytest.fixture(scope="module")
def encoder(tiny_sparse_dir):
    from sce_jax.encoder import SparseCrossEncoder

    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)


SETTINGS = ServeSettings(max_batch_docs=64, max_wait_ms=100, max_docs_per_request=20, max_request_bytes=20_000,
                         max_queue_docs=400, batch_size=8, model_name="tiny")


@pytest.fixture(scope="module")
def served(encoder):
    spy = Spy(encoder)
    server = InProcessServer(create_app(spy, SETTINGS, warmup=False))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client, spy
    server.stop()


def _wait_for(client, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate(client.get("/health").json()):
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.02)


# --- pure helpers ------------------------------------------------------------------------------------------------


def test_take_group_is_the_longest_prefix_within_the_limit_and_never_empty():
    assert take_group([3, 4, 5], 7) == 2
    assert take_group([3, 4, 5], 12) == 3
    assert take_group([10, 1], 4) == 1  # one oversized request goes alone
    assert take_group([2, 9, 1], 4) == 1  # arrival order is kept: no skipping ahead
    assert take_group([], 4) == 0


def test_ranked_order_is_descending_and_stable_and_sigmoid_matches_definition():
    assert ranked_order(np.array([0.5, 2.0, 0.5, -1.0], np.float32)).tolist() == [1, 0, 2, 3]
    logits = np.array([-3.0, 0.0, 2.5], np.float32)
    np.testing.assert_allclose(sigmoid(logits), [1 / (1 + np.e**3), 0.5, 1 / (1 + np.e**-2.5)], rtol=1e-12)


def test_validation_messages_name_the_field():
    assert validation_message([{"loc": ("texts", 2), "msg": "Input should be a valid string"}]) == \
        "texts[2]: Input should be a valid string"
    assert validation_message([{"loc": ("documents", 1, "str"), "msg": "x"}, {"loc": ("documents", 1, "Document"),
                                                                              "msg": "y"}]).startswith("documents[1]")


# --- scoring through both endpoints ----------------------------------------------------------------------------


def test_tei_rerank_matches_offline_scores(served, encoder):
    client, _ = served
    rng = np.random.default_rng(0)
    query, texts = "where do cats sit", _texts(rng, 7) + [" ".join(["cat"] * 200)]  # the last one is truncated
    expected = encoder.score(query, texts)
    raw = client.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True, "return_text": True})
    assert raw.status_code == 200, raw.text
    results = raw.json()
    assert sorted(r["index"] for r in results) == list(range(len(texts)))
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for r in results:
        assert r["text"] == texts[r["index"]]
    assert_batch_close([r["score"] for r in sorted(results, key=lambda r: r["index"])], expected)
    # Default: TEI's normalised scores (sigmoid of the logits), same order; no texts unless asked.
    default = client.post("/rerank", json={"query": query, "texts": texts}).json()
    assert [r["index"] for r in default] == [r["index"] for r in results]
    assert all("text" not in r for r in default)
    np.testing.assert_allclose([r["score"] for r in default], sigmoid([r["score"] for r in results]), rtol=1e-6)


def test_cohere_rerank_matches_offline_scores(served, encoder):
    client, _ = served
    rng = np.random.default_rng(1)
    query, texts = "banana bread recipe", _texts(rng, 6)
    documents = [text if i % 2 else {"text": text, "id": i} for i, text in enumerate(texts)]
    expected = sigmoid(encoder.score(query, texts))
    answer = client.post("/v1/rerank", json={"query": query, "documents": documents, "model": "anything"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "tiny" and body["id"]
    results = body["results"]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    assert_batch_close([r["relevance_score"] for r in results], np.sort(expected)[::-1])
    assert all("document" not in r for r in results)
    top = client.post("/v1/rerank", json={"query": query, "documents": texts, "top_n": 2,
                                          "return_documents": True}).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert [r["document"] for r in top] == [{"text": texts[r["index"]]} for r in top]
    assert len(client.post("/v1/rerank", json={"query": query, "documents": texts, "top_n": 50}).json()["results"]) == 6


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(served, encoder):
    client, spy = served
    rng = np.random.default_rng(2)
    requests = [(" ".join(rng.choice(WORDS, 3)), _texts(rng, int(rng.integers(1, 15)))) for _ in range(12)]
    requests[5] = (requests[4][0], requests[5][1])  # two requests with the same query stay separate
    barrier = threading.Barrier(len(requests))
    answers = [None] * len(requests)
    spy.group_sizes.clear()

    def send(i):
        query, texts = requests[i]
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            barrier.wait()
            answers[i] = own.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for (query, texts), answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        got = {r["index"]: r["score"] for r in answer.json()}
        assert sorted(got) == list(range(len(texts)))
        assert_batch_close([got[i] for i in range(len(texts))], encoder.score(query, texts))
    assert max(spy.group_sizes) > 1, spy.group_sizes  # documents of several requests shared scoring calls
    assert sum(spy.group_sizes) == len(requests)


# --- errors: each a 4xx with a JSON body; good requests around them are unaffected ------------------------------

ERRORS = [
    ("/rerank", b"{not json", 422, "Invalid JSON"),
    ("/rerank", b'["a", "b"]', 422, "object"),
    ("/rerank", json.dumps({"texts": ["a"]}).encode(), 422, "query"),
    ("/rerank", json.dumps({"query": "q", "texts": "a"}).encode(), 422, "texts"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a", 3]}).encode(), 422, "texts[1]"),
    ("/rerank", json.dumps({"query": 5, "texts": ["a"]}).encode(), 422, "query"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a"], "raw_scores": "yes"}).encode(), 422, "raw_scores"),
    ("/rerank", json.dumps({"query": "  ", "texts": ["a"]}).encode(), 422, "query is empty"),
    ("/rerank", json.dumps({"query": "q", "texts": []}).encode(), 422, "no documents"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a"], "truncation_direction": "left"}).encode(), 422, "right"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a"] * 21}).encode(), 413, "21 documents"),
    ("/rerank", json.dumps({"query": "q", "texts": ["word " * 5000]}).encode(), 413, "bytes"),
    ("/rerank", json.dumps({"query": "q", "texts": ["ok", "cat " * 80], "truncate": False}).encode(), 413,
     "documents [1] exceed max_length"),
    ("/v1/rerank", json.dumps({"query": "q", "documents": [{"txt": "a"}]}).encode(), 422, "documents[0]"),
    ("/v1/rerank", json.dumps({"query": "q", "documents": []}).encode(), 422, "no documents"),
    ("/v1/rerank", json.dumps({"query": "q", "documents": ["a"], "top_n": 0}).encode(), 422, "top_n"),
    ("/v1/rerank", json.dumps({"query": "q", "documents": ["a"], "top_n": "2"}).encode(), 422, "top_n"),
    ("/v1/rerank", json.dumps({"query": "q", "documents": ["a"] * 21}).encode(), 413, "21 documents"),
]


@pytest.mark.parametrize("path, body, status, fragment", ERRORS, ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_bad_requests_get_their_4xx_with_a_json_body(served, path, body, status, fragment):
    client, _ = served
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert fragment in answer.json()["error"] and answer.json()["error_type"] == "Validation"


def test_body_limit_holds_without_content_length(served):
    client, _ = served

    def chunks():  # chunked transfer: no Content-Length to check up front
        for _ in range(50):
            yield b" " * 1000

    answer = client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "bytes" in answer.json()["error"]


def test_truncate_true_scores_over_long_documents_as_the_cli_does(served, encoder):
    client, _ = served
    texts = ["cat " * 80, "dog sat"]
    got = client.post("/rerank", json={"query": "cat", "texts": texts, "raw_scores": True, "truncate": True}).json()
    assert_batch_close([r["score"] for r in sorted(got, key=lambda r: r["index"])], encoder.score("cat", texts))


# --- readiness, backpressure ----------------------------------------------------------------------------------


def test_not_ready_until_warm_up_is_done():
    stub = StubEncoder()
    server = InProcessServer(create_app(stub, ServeSettings(max_batch_docs=4), warmup=True))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["ready"] is False
            assert client.get("/ready").status_code == 503
            answer = client.post("/rerank", json={"query": "q", "texts": ["a"]})
            assert answer.status_code == 503 and "warming up" in answer.json()["error"]
            stub.gate.set()
            deadline = time.monotonic() + 30
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200
    finally:
        stub.gate.set()
        server.stop()


def test_full_queue_answers_503_and_the_queued_requests_still_finish():
    stub = StubEncoder()
    settings = ServeSettings(max_batch_docs=3, max_wait_ms=0, max_docs_per_request=4, max_queue_docs=4)
    server = InProcessServer(create_app(stub, settings, warmup=False))
    answers = {}

    def send(name, texts):
        with httpx.Client(base_url=server.url, timeout=60) as own:
            answers[name] = own.post("/rerank", json={"query": "q", "texts": texts, "raw_scores": True})

    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            first = threading.Thread(target=send, args=("scoring", ["aaa", "b", "cc"]))
            first.start()
            _wait_for(client, lambda h: h["scoring_docs"] == 3)
            second = threading.Thread(target=send, args=("queued", ["dddd", "e", "ff"]))
            second.start()
            _wait_for(client, lambda h: h["queued_docs"] == 3)
            full = client.post("/rerank", json={"query": "q", "texts": ["g", "h"]})
            assert full.status_code == 503 and full.json()["error_type"] == "Overloaded"
            assert full.headers["retry-after"] == "1"
            stub.gate.set()
            first.join(30)
            second.join(30)
        assert [r["index"] for r in answers["scoring"].json()] == [0, 2, 1]
        assert [(r["index"], r["score"]) for r in answers["queued"].json()] == [(0, 4.0), (2, 2.0), (1, 1.0)]
    finally:
        stub.gate.set()
        server.stop()


def test_a_scoring_failure_is_a_json_500_for_its_group_only():
    class Failing(StubEncoder):
        def score_pairs(self, queries, docs, doc_query, **kwargs):
            if "boom" in queries:
                raise RuntimeError("scoring exploded")
            return super().score_pairs(queries, docs, doc_query, **kwargs)

    stub = Failing()
    stub.gate.set()
    server = InProcessServer(create_app(stub, ServeSettings(max_wait_ms=0), warmup=False))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            failed = client.post("/rerank", json={"query": "boom", "texts": ["a"]})
            assert failed.status_code == 500 and "scoring exploded" in failed.json()["error"]
            assert client.post("/rerank", json={"query": "fine", "texts": ["a", "bb"]}).json()[0]["index"] == 1
    finally:
        server.stop()


def test_batcher_refuses_beyond_its_queue_and_scores_what_it_holds_when_closed():
    stub = StubEncoder()
    batcher = Batcher(stub, ServeSettings(max_batch_docs=2, max_wait_ms=0, max_queue_docs=3,
                                          max_docs_per_request=3))
    first = batcher.submit("q", ["aa", "b"])
    deadline = time.monotonic() + 10
    while batcher.scoring_docs != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = batcher.submit("q", ["ccc", "dddd", "e"])
    with pytest.raises(QueueFull):
        batcher.submit("q", ["f"])
    stub.gate.set()
    batcher.close(30)
    assert first.result(1).tolist() == [2, 1] and second.result(1).tolist() == [3, 4, 1]


# --- the process: command line errors, graceful shutdown ---------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--model", "/nonexistent/model"], "'/nonexistent/model' not found"),
    (["--model", "m", "--bogus"], "unrecognized arguments"),
    (["--model", "m", "--max-docs-per-request", "10", "--max-queue-docs", "5"], "could never be queued"),
    (["--model", "m", "--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--model", "m", "--port", "70000"], "--port"),
    (["--port", "0"], "--model"),
])
def test_bad_flags_and_models_are_one_error_line(args, fragment, capsys):
    assert run_cli(main, [*args, "--port", "0"] if "--port" not in args else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_a_taken_port_is_one_error_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert run_cli(main, ["--model", "m", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen" in err[0]


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tiny_sparse_dir, encoder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "sce_jax.serve", "--model", str(tiny_sparse_dir), "--port", "0", "--no-warmup",
         "--max-length", str(MAX_LENGTH), "--max-query-length", str(MAX_QUERY_LENGTH), "--max-wait-ms", "1500"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    log, port = [], []

    def read_log():
        for line in process.stderr:
            log.append(line)
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port.append(int(match[1]))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not port:
            assert time.monotonic() < deadline and process.poll() is None, "".join(log)
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port[0]}"
        rng = np.random.default_rng(3)
        requests = [("cats and dogs", _texts(rng, 4)), ("stock market", _texts(rng, 6)), ("bees", _texts(rng, 2))]
        answers = [None] * len(requests)

        def send(i):
            query, texts = requests[i]
            with httpx.Client(base_url=url, timeout=120) as own:
                answers[i] = own.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        with httpx.Client(base_url=url, timeout=30) as client:
            for thread in threads:
                thread.start()
            _wait_for(client, lambda h: h["in_flight"] == len(requests) and h["queued_docs"] == 12)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # new requests: the listening socket is closed (or, on a connection still open, a 503)
            late = httpx.post(f"{url}/rerank", json={"query": "q", "texts": ["a"]}, timeout=10)
            assert late.status_code == 503
        except httpx.TransportError:
            pass
        for thread in threads:
            thread.join(120)
        for (query, texts), answer in zip(requests, answers):
            assert answer is not None and answer.status_code == 200
            got = {r["index"]: r["score"] for r in answer.json()}
            assert_batch_close([got[i] for i in range(len(texts))], encoder.score(query, texts))
        # uvicorn re-raises the signal once it has shut down gracefully (a shell sees 143).
        assert process.wait(60) == -signal.SIGTERM
        reader.join(10)
        assert any("shutting down" in line for line in log) and any("stopped" in line for line in log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
