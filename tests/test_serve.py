"""The HTTP server: every endpoint against offline `score`, Cohere's SDK, dynamic batching, every error answer,
readiness and warm-up, backpressure, connection limits and deadlines, clients that vanish, the API key, metrics,
shutdown, and the command line's errors. Servers listen on 127.0.0.1 only."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from sce_jax.errors import run_cli  # noqa: E402
from sce_jax.serve import ServeSettings, create_app, main  # noqa: E402
from sce_jax.serve.batcher import Batcher, QueueFull, take_group  # noqa: E402
from sce_jax.serve.checks import ranked_order, served_model_name, sigmoid, validation_message  # noqa: E402
from sce_jax.serve.cli import listen, parse_args, settings_from  # noqa: E402
from sce_jax.serve.http11 import make_server  # noqa: E402
from sce_jax.serve.tokens import leading_wordpieces, prepare, space_cut  # noqa: E402
from sce_jax.serve.warmup import EXAMPLE_QUERY, EXAMPLE_TEXTS  # noqa: E402
from scores import assert_batch_close  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64
MAX_QUERY_LENGTH = 16
KEY = "test-key-5f3a9c"
WORDS = ("cat dog bank river money stock market fell rose sharply the a of in on sat mat park chase bread banana "
         "recipe bees honey nectar wasps nests city people live population museum").split()


def _texts(rng, count, low=3, high=40):
    return [" ".join(rng.choice(WORDS, rng.integers(low, high))) for _ in range(count)]


class InProcessServer:
    """The server's own uvicorn setup (`make_server`) in a thread, on an ephemeral 127.0.0.1 port."""

    def __init__(self, app, **http):
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, log_level="warning", **http)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


class Spy:
    """The encoder, recording the queries of each scoring call."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.compiled_shapes = encoder.compiled_shapes
        self.group_sizes = []

    def score_tokens(self, query_tokens, *args, **kwargs):
        self.group_sizes.append(len(query_tokens))
        return self.encoder.score_tokens(query_tokens, *args, **kwargs)

    def compile_tokens(self, *args, **kwargs):
        return self.encoder.compile_tokens(*args, **kwargs)


class StubTokenizer:
    """Every non-space character is a token."""

    max_length = MAX_LENGTH
    sep_token_id = 0

    def encode_queries(self, queries):
        return [[ord(c) for c in q if not c.isspace()][: MAX_QUERY_LENGTH - 2] + [0, 0] for q in queries]

    def doc_budget(self, query_tokens):
        return self.max_length - 3 - len(query_tokens)

    def encode_docs(self, query_tokens, docs, *, truncate=True):
        assert not truncate
        return [[ord(c) for c in doc if not c.isspace()] for doc in docs]


class StubEncoder:
    """Scores a document by its characters (spaces aside); scoring waits for `gate` and records the rows."""

    def __init__(self):
        self.gate = threading.Event()
        self.tokenizer = StubTokenizer()
        self.compiled_shapes = set()
        self.scored = []

    def score_tokens(self, query_tokens, rows, row_query, **kwargs):
        assert self.gate.wait(60)
        self.scored += ["".join(map(chr, row[:-2])) for row in rows]
        return np.array([len(row) - 2 for row in rows], np.float32)

    def compile_tokens(self, query_tokens, rows, row_query, **kwargs):
        return 0


def _ready(client):
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture
def stub_server(request):
    """A server around a StubEncoder (gate open unless the test closes it); `request.param`: settings fields."""
    stub = StubEncoder()
    stub.gate.set()
    fields = dict(getattr(request, "param", {}))
    http = {name: fields.pop(name) for name in ("max_connections", "header_timeout", "keep_alive_timeout")
            if name in fields}
    server = InProcessServer(create_app(stub, ServeSettings(**{"max_wait_ms": 0, **fields}), warmup=False), **http)
    try:
        yield stub, server
    finally:
        stub.gate.set()
        server.stop()


@pytest.fixture(scope="module")
def encoder(tiny_sparse_dir):
    from sce_jax.encoder import SparseCrossEncoder

    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)


SETTINGS = dict(max_batch_docs=64, max_wait_ms=100, max_docs_per_request=20, max_request_bytes=20_000,
                max_queue_docs=400, batch_size=8, model_name="tiny")


@pytest.fixture(scope="module")
def served(encoder):
    spy = Spy(encoder)
    server = InProcessServer(create_app(spy, ServeSettings(**SETTINGS), warmup=False))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        _ready(client)
        yield client, spy
    server.stop()


def _wait_for(client, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate(client.get("/health").json()):
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.02)


def _by_index(results, key="score"):
    return [r[key] for r in sorted(results, key=lambda r: r["index"])]


def _http_response(sock) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a content-length read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


class Records(logging.Handler):
    """Every record of the server's and uvicorn's loggers, at every level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.loggers = [logging.getLogger(name) for name in ("sce_jax", "uvicorn", "uvicorn.error")]

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self)
            lg.setLevel(level)

    def text(self):
        return "\n".join(self.format(r) + (f" {r.exc_info}" if r.exc_info else "") for r in self.records)


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


def test_space_cut_keeps_whole_words():
    assert space_cut("abc def ghi", 100) == "abc def ghi"
    assert space_cut("abc def ghi", 6) == "abc"
    assert space_cut("abc def ghi", 7) == "abc def"
    assert space_cut("abcdefgh ij", 3) == "abcdefgh"  # no space before: up to the first one after
    assert space_cut("abcdefghij", 3) == "abcdefghij"


def test_leading_wordpieces_are_those_of_the_whole_text(encoder):
    """Cutting before tokenizing keeps the first wordpieces exactly: punctuation, accents, CJK, long words, runs
    of spaces and newlines, and texts with few spaces."""
    tokenizer = encoder.tokenizer
    rng = np.random.default_rng(7)
    vocabulary = WORDS + ["Café", "naïve", "東京都", "x" * 150, "re-rank,", "(MaxP)", "\n", "  ", "ünïcödé",
                          "3.14", "https://example.org/a?b=c", "\u200bzero", "tab\there"]
    texts = [" ".join(rng.choice(vocabulary, rng.integers(1, 400))) for _ in range(40)]
    texts += ["", " ", "word", "a" * 5000 + " tail", "one " + "b" * 3000, "東京" * 900]
    full = tokenizer.encode_docs([()] * len(texts), texts, truncate=False)
    for keep in (1, 7, 61):
        got = leading_wordpieces(tokenizer, texts, keep)
        for text, whole, ids in zip(texts, full, got):
            assert ids == whole[: len(ids)] and len(ids) >= min(keep, len(whole)), (keep, text[:80])


# --- scoring through every endpoint ----------------------------------------------------------------------------


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
    assert_batch_close(_by_index(results), expected)
    # Default: TEI's normalised scores (sigmoid of the logits), same order; no texts unless asked.
    default = client.post("/rerank", json={"query": query, "texts": texts}).json()
    assert [r["index"] for r in default] == [r["index"] for r in results]
    assert all("text" not in r for r in default)
    np.testing.assert_allclose([r["score"] for r in default], sigmoid([r["score"] for r in results]), rtol=1e-6)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_cohere_rerank_matches_offline_scores(served, encoder, path):
    client, _ = served
    rng = np.random.default_rng(1)
    query, texts = "banana bread recipe", _texts(rng, 6)
    documents = [text if i % 2 else {"text": text, "id": i} for i, text in enumerate(texts)]
    expected = sigmoid(encoder.score(query, texts))
    answer = client.post(path, json={"query": query, "documents": documents, "model": "anything"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "tiny" and body["id"] and body["meta"]["api_version"]["version"] == path[2]
    results = body["results"]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    assert_batch_close([r["relevance_score"] for r in results], np.sort(expected)[::-1])
    assert all("document" not in r for r in results)
    top = client.post(path, json={"query": query, "documents": texts, "top_n": 2,
                                  "return_documents": True}).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert [r["document"] for r in top] == [{"text": texts[r["index"]]} for r in top]
    assert len(client.post(path, json={"query": query, "documents": texts, "top_n": 50}).json()["results"]) == 6
    raw = client.post(path, json={"query": query, "documents": texts, "raw_scores": True}).json()["results"]
    assert_batch_close(_by_index(raw, "relevance_score"), encoder.score(query, texts))


def test_max_tokens_per_doc_cuts_documents_to_that_many_wordpieces(served, encoder):
    client, _ = served
    texts = ["bees make honey from nectar in the hive", "cat sat on the mat"]
    got = client.post("/v2/rerank", json={"model": "m", "query": "bees", "documents": texts, "raw_scores": True,
                                          "max_tokens_per_doc": 3}).json()["results"]
    expected = encoder.score("bees", ["bees make honey", "cat sat on"])
    assert_batch_close(_by_index(got, "relevance_score"), expected)


def test_cohere_sdk_clients_v1_and_v2_against_the_server(encoder):
    """Cohere's own Python SDK: `Client` posts to /v1/rerank, `ClientV2` (LangChain's CohereRerank) to
    /v2/rerank; both send the API key as a bearer token."""
    cohere = pytest.importorskip("cohere")
    server = InProcessServer(create_app(encoder, ServeSettings(**{**SETTINGS, "api_key": KEY}), warmup=False))
    try:
        rng = np.random.default_rng(11)
        query, texts = "honey bees", _texts(rng, 5)
        expected = sigmoid(encoder.score(query, texts))
        order = np.argsort(-expected, kind="stable").tolist()
        v1 = cohere.Client(api_key=KEY, base_url=server.url, timeout=60)
        answer = v1.rerank(model="anything", query=query, documents=texts, top_n=3, return_documents=True)
        assert [r.index for r in answer.results] == order[:3]
        assert_batch_close([r.relevance_score for r in answer.results], expected[order[:3]])
        assert [r.document.text for r in answer.results] == [texts[i] for i in order[:3]]
        v2 = cohere.ClientV2(api_key=KEY, base_url=server.url, timeout=60)
        answer = v2.rerank(model="anything", query=query, documents=texts, top_n=4)
        assert [r.index for r in answer.results] == order[:4]
        assert_batch_close([r.relevance_score for r in answer.results], expected[order[:4]])
        answer = v2.rerank(model="anything", query=query, documents=texts)
        assert sorted(r.index for r in answer.results) == list(range(5))
        with pytest.raises(Exception) as refused:  # the SDK's UnauthorizedError
            cohere.ClientV2(api_key="wrong", base_url=server.url, timeout=60).rerank(model="m", query=query,
                                                                                     documents=texts)
        assert getattr(refused.value, "status_code", None) == 401
    finally:
        server.stop()


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
        assert_batch_close(_by_index(answer.json()), encoder.score(query, texts))
    assert max(spy.group_sizes) > 1, spy.group_sizes  # documents of several requests shared scoring calls
    assert sum(spy.group_sizes) == len(requests)


def test_a_huge_document_is_cut_before_tokenizing_and_off_the_batcher_thread(encoder):
    """A 600 KB document costs a few kilobytes of tokenization, on the tokenizer thread; its score is the one
    `score` gives for the whole text."""

    class Watched:
        def __init__(self, tokenizer):
            self.tokenizer, self.calls = tokenizer, []

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def encode_docs(self, query_tokens, docs, **kwargs):
            self.calls.append((threading.current_thread().name, max(map(len, docs))))
            return self.tokenizer.encode_docs(query_tokens, docs, **kwargs)

    class Watching(Spy):
        def __init__(self, encoder):
            super().__init__(encoder)
            self.tokenizer = Watched(encoder.tokenizer)

    watching = Watching(encoder)
    server = InProcessServer(create_app(watching, ServeSettings(max_request_bytes=8 << 20), warmup=False))
    try:
        rng = np.random.default_rng(5)
        huge = " ".join(rng.choice(WORDS, 120_000))
        texts = [huge, "bees make honey", huge[:300]]
        answer = httpx.post(f"{server.url}/rerank", json={"query": "bees", "texts": texts, "raw_scores": True},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        assert_batch_close(_by_index(answer.json()), encoder.score("bees", texts))
        calls = watching.tokenizer.calls
        assert calls and all(name.startswith("sce-jax-tokenize") for name, _ in calls), calls
        assert max(longest for _, longest in calls) < 10_000 < len(huge), calls
    finally:
        server.stop()


def test_max_p_scores_match_offline(encoder):
    server = InProcessServer(create_app(encoder, ServeSettings(max_p=True, batch_size=8), warmup=False))
    try:
        rng = np.random.default_rng(6)
        texts = [" ".join(rng.choice(WORDS, n)) for n in (5, 70, 150)]
        answer = httpx.post(f"{server.url}/rerank", json={"query": "stock market", "texts": texts,
                                                          "raw_scores": True}, timeout=120)
        assert answer.status_code == 200, answer.text
        expected = encoder.score_pairs(["stock market"], texts, [0, 0, 0], max_p=True, progress=False)
        assert_batch_close(_by_index(answer.json()), expected)
    finally:
        server.stop()


def test_truncate_true_scores_over_long_documents_as_the_cli_does(served, encoder):
    client, _ = served
    texts = ["cat " * 80, "dog sat"]
    got = client.post("/rerank", json={"query": "cat", "texts": texts, "raw_scores": True, "truncate": True}).json()
    assert_batch_close(_by_index(got), encoder.score("cat", texts))


# --- errors: each the documented JSON body; good requests around them are unaffected ------------------------------

ERRORS = [
    ("/rerank", b"{not json", 422, "Invalid JSON"),
    ("/rerank", b'["a", "b"]', 422, "object"),
    ("/rerank", json.dumps({"texts": ["a"]}).encode(), 422, "query"),
    ("/rerank", json.dumps({"query": "q", "texts": "a"}).encode(), 422, "texts"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a", 3]}).encode(), 422, "texts[1]"),
    ("/rerank", json.dumps({"query": 5, "texts": ["a"]}).encode(), 422, "query"),
    ("/rerank", json.dumps({"query": "q", "texts": ["a"], "raw_scores": "yes"}).encode(), 422, "raw_scores"),
    ("/rerank", json.dumps({"query": "  ", "texts": ["a"]}).encode(), 422, "query is empty ("),
    ("/rerank", json.dumps({"query": "\u200b\u200b", "texts": ["a"]}).encode(), 422, "query is empty ("),
    ("/rerank", json.dumps({"query": "\u0000", "texts": ["a"]}).encode(), 422, "query is empty ("),
    ("/rerank", json.dumps({"query": "\ufeff\u200d\t\u2028", "texts": ["a"]}).encode(), 422, "query is empty ("),
    ("/rerank", json.dumps({"query": "\u0301\u0301", "texts": ["a"]}).encode(), 422, "query is empty after"),
    ("/rerank", b'{"query": "q\\ud800", "texts": ["a"]}', 422, "Invalid JSON"),  # a lone surrogate
    ("/rerank", b'{"query": "q", "texts": ["a", "b\\udc00"]}', 422, "Invalid JSON"),
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
    ("/v2/rerank", json.dumps({"query": "\u200b", "documents": ["a"]}).encode(), 422, "query is empty ("),
    ("/v2/rerank", json.dumps({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}).encode(), 422,
     "max_tokens_per_doc"),
]


@pytest.mark.parametrize("path, body, status, fragment", ERRORS, ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_bad_requests_get_their_4xx_with_a_json_body(served, path, body, status, fragment):
    client, _ = served
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert fragment in answer.json()["error"] and answer.json()["error_type"] == "Validation"


def test_every_other_status_has_the_documented_json_body(stub_server):
    stub, server = stub_server
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, status, error_type in [("GET", "/nope", 404, "NotFound"), ("GET", "/rerank", 405,
                                                 "MethodNotAllowed"), ("DELETE", "/health", 405, "MethodNotAllowed")]:
            answer = client.request(method, path)
            assert answer.status_code == status and answer.json()["error_type"] == error_type, answer.text
            assert set(answer.json()) == {"error", "error_type"} and path in answer.json()["error"]
        assert client.get("/rerank").headers["allow"] == "POST"
        for path in ("/docs", "/redoc", "/openapi.json"):  # API docs are off unless asked for
            assert client.get(path).status_code == 404
        stub.compiled_shapes = None  # a bug in the server: /health fails
        answer = client.get("/health")
        assert answer.status_code == 500 and answer.json() == {"error": "internal error (logged by the server)",
                                                               "error_type": "Backend"}
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # not HTTP at all
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = _http_response(raw)
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["error_type"] == "Validation"


def test_api_docs_when_asked(encoder):
    server = InProcessServer(create_app(encoder, ServeSettings(api_docs=True), warmup=False))
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(server.url + path, timeout=30).status_code == 200
        assert "/v2/rerank" in httpx.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    finally:
        server.stop()


def test_answers_name_the_model_never_its_local_path(tiny_sparse_dir, monkeypatch):
    args = ["--model", str(tiny_sparse_dir)]
    assert settings_from(parse_args(args)).model_name == tiny_sparse_dir.name
    assert settings_from(parse_args([*args, "--served-model-name", "sce-tiny"])).model_name == "sce-tiny"
    assert served_model_name("webis/sparse-cross-encoder-4-512") == "webis/sparse-cross-encoder-4-512"
    monkeypatch.chdir(tiny_sparse_dir)
    assert served_model_name(".") == tiny_sparse_dir.name


@pytest.mark.parametrize("stub_server", [{"model_name": "broken-model"}], indirect=True)
def test_non_finite_scores_are_never_returned(stub_server):
    stub, server = stub_server
    original = stub.score_tokens
    stub.score_tokens = lambda *a, **k: np.where(original(*a, **k) == 2, np.float32("nan"), original(*a, **k))
    for path, field in (("/rerank", "texts"), ("/v1/rerank", "documents"), ("/v2/rerank", "documents")):
        answer = httpx.post(server.url + path, json={"query": "q", field: ["a", "bb", "c", "dd"]}, timeout=30)
        assert answer.status_code == 500, answer.text
        assert answer.json() == {"error": "2 of 4 scores are not finite (NaN or infinite): model broken-model is "
                                          "broken", "error_type": "Backend"}
    stub.score_tokens = lambda *a, **k: np.full(len(a[1]), np.inf, np.float32)
    answer = httpx.post(server.url + "/rerank", json={"query": "q", "texts": ["a"], "raw_scores": True}, timeout=30)
    assert answer.status_code == 500 and "1 of 1 scores are not finite" in answer.json()["error"]


@pytest.mark.parametrize("stub_server", [{"model_name": "broken-model"}], indirect=True)
def test_the_encoders_own_finite_check_answers_without_the_local_path(stub_server):
    """`score_tokens` raises NonFiniteScoresError naming the model's source (a local path): the answer names the
    served model instead."""
    from sce_jax.errors import NonFiniteScoresError

    stub, server = stub_server

    def broken(*args, **kwargs):
        raise NonFiniteScoresError("model '/srv/secret/models/sce' gave non-finite scores (NaN or infinity) for 1 of 1")

    stub.score_tokens = broken
    answer = httpx.post(server.url + "/v2/rerank", json={"query": "q", "documents": ["a"]}, timeout=30)
    assert answer.status_code == 500, answer.text
    assert "/srv/secret" not in answer.text and "broken-model" in answer.json()["error"]
    assert answer.json()["error_type"] == "Backend"


def test_body_limit_holds_without_content_length(served):
    client, _ = served

    def chunks():  # chunked transfer: no Content-Length to check up front
        for _ in range(50):
            yield b" " * 1000

    answer = client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "bytes" in answer.json()["error"]


# --- readiness, warm-up, logging, backpressure -----------------------------------------------------------------


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
            _ready(client)
            assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200
    finally:
        stub.gate.set()
        server.stop()


class XlaCompilations:
    """Counts XLA compilations (not reads from jax's persistent cache) while it is entered."""

    def __enter__(self):
        self.count = 0

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":  # jax._src.dispatch.BACKEND_COMPILE_EVENT
                self.count += 1

        self.listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self.listener)


def _documented_requests():
    """(path, body) of every curl example in README.md and docs/serve.md."""
    found = []
    for doc in (REPO / "README.md", REPO / "docs" / "serve.md"):
        for path, body in re.findall(r"curl -s \S*?(/[\w/]*rerank)\b.*?-d '(\{.*?\})'", doc.read_text(), re.S):
            found.append((path, json.loads(body)))
    return found


@pytest.mark.slow
def test_warm_up_covers_the_documented_examples_and_logs_its_progress(tiny_sparse_dir):
    """After the warm-up, the README's and docs' example requests compile nothing; the warm-up says what it
    compiles (n of m); probes are logged at DEBUG, other requests at INFO."""
    from sce_jax.encoder import SparseCrossEncoder

    examples = _documented_requests()
    assert len(examples) >= 4 and {path for path, _ in examples} >= {"/rerank", "/v1/rerank", "/v2/rerank"}
    for _, body in examples:
        texts = body.get("texts") or [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        assert (body["query"], texts) == (EXAMPLE_QUERY, list(EXAMPLE_TEXTS))
    fresh = SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=MAX_QUERY_LENGTH)
    with Records() as log:
        server = InProcessServer(create_app(fresh, ServeSettings(max_batch_docs=8, batch_size=4), warmup=True))
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                _ready(client)
                compiled = set(fresh.compiled_shapes)
                with XlaCompilations() as after_warm_up:
                    for path, body in examples:
                        assert client.post(path, json=body).status_code == 200
                    # Shapes compiled ahead without running (a passage and 8 documents of ~100 tokens) run with no
                    # new XLA compilation either.
                    body = {"query": "warm up", "texts": [" ".join(["a"] * (90 - i)) for i in range(8)]}
                    assert client.post("/rerank", json=body).status_code == 200
                    assert client.post("/rerank", json={"query": "warm up", "texts": ["a " * 40]}).status_code == 200
                assert fresh.compiled_shapes == compiled
                assert after_warm_up.count == 0
                client.get("/health")
        finally:
            server.stop()
    progress = [r.getMessage() for r in log.records if r.getMessage().startswith("warm-up ")]
    assert progress[0].startswith("warm-up 1/") and "documented example" in progress[0], progress
    assert any(re.match(r"warm-up done: \d+ batch shapes compiled in", line) for line in progress)
    for record in log.records:
        if re.search(r" GET /(health|ready) ", record.getMessage()):
            assert record.levelno == logging.DEBUG, record.getMessage()
    assert any(r.levelno == logging.INFO and " POST /v2/rerank 200 " in r.getMessage() for r in log.records)


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


def test_a_scoring_failure_is_a_json_500_for_its_group_only(stub_server):
    stub, server = stub_server
    original = stub.score_tokens

    def failing(query_tokens, *args, **kwargs):
        if [ord(c) for c in "boom"] + [0, 0] in query_tokens:
            raise RuntimeError("scoring exploded")
        return original(query_tokens, *args, **kwargs)

    stub.score_tokens = failing
    with httpx.Client(base_url=server.url, timeout=30) as client:
        failed = client.post("/rerank", json={"query": "boom", "texts": ["a"]})
        assert failed.status_code == 500 and "scoring exploded" in failed.json()["error"]
        assert failed.json()["error_type"] == "Backend"
        assert client.post("/rerank", json={"query": "fine", "texts": ["a", "bb"]}).json()[0]["index"] == 1


def test_batcher_refuses_beyond_its_queue_and_scores_what_it_holds_when_closed():
    stub = StubEncoder()
    batcher = Batcher(stub, ServeSettings(max_batch_docs=2, max_wait_ms=0, max_queue_docs=3,
                                          max_docs_per_request=3))

    def submit(texts):
        batcher.admit(len(texts))
        return batcher.submit(prepare(stub.tokenizer, "q", texts))

    first = submit(["aa", "b"])
    deadline = time.monotonic() + 10
    while batcher.scoring_docs != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = submit(["ccc", "dddd", "e"])
    with pytest.raises(QueueFull):
        batcher.admit(1)
    stub.gate.set()
    batcher.close(30)
    assert first.future.result(1).tolist() == [2, 1] and second.future.result(1).tolist() == [3, 4, 1]


# --- clients that vanish or never finish their request -----------------------------------------------------------


def _post_head(path: str, body: bytes, port: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode()


def test_requests_of_disconnected_clients_are_dropped_before_scoring(stub_server):
    stub, server = stub_server
    stub.gate.clear()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        holder = threading.Thread(target=lambda: httpx.post(server.url + "/rerank", timeout=60,
                                                            json={"query": "q", "texts": ["first"]}))
        holder.start()
        _wait_for(client, lambda h: h["scoring_docs"] == 1)
        gone = []
        for i in range(5):  # each sends a whole request, then hangs up
            body = json.dumps({"query": "q", "texts": [f"gone{i}x", f"gone{i}y"]}).encode()
            raw = socket.create_connection(("127.0.0.1", server.port))
            raw.sendall(_post_head("/rerank", body, server.port) + body)
            gone.append(raw)
        _wait_for(client, lambda h: h["queued_docs"] == 10)
        for raw in gone:
            raw.close()
        _wait_for(client, lambda h: h["queued_docs"] == 0)  # dropped from the queue at once
        stub.gate.set()
        holder.join(30)
        assert client.post("/rerank", json={"query": "q", "texts": ["later"]}).status_code == 200
        metrics = client.get("/metrics").text
    assert stub.scored == ["first", "later"]
    assert 'sce_jax_requests_total{endpoint="/rerank",status="499"} 5.0' in metrics


@pytest.mark.parametrize("stub_server", [{"max_connections": 8, "header_timeout": 3.0}], indirect=True)
def test_idle_and_half_sent_connections_cannot_lock_out_new_clients(stub_server):
    """More idle connections than the limit, some with half a request head: a new client is told (JSON 503), the
    hoarded connections are closed when their head deadline passes (a JSON 408 where a head had begun), and new
    clients are served again."""
    _, server = stub_server
    hoard = []
    try:
        for i in range(11):
            raw = socket.create_connection(("127.0.0.1", server.port))
            if i % 2:
                raw.sendall(b"POST /rerank HTTP/1.1\r\nhost: x\r\ncontent-")
            hoard.append(raw)
        refused = httpx.post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error_type"] == "Overloaded", refused.text
        for i, raw in enumerate(hoard):
            raw.settimeout(60)
            if i % 2:
                status, _, body = _http_response(raw)
                assert status == 408 and json.loads(body)["error_type"] == "Timeout"
            assert raw.recv(1024) == b""  # closed
        answer = httpx.post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        for raw in hoard:
            raw.close()


@pytest.mark.parametrize("stub_server", [{"body_timeout": 1.0}], indirect=True)
def test_a_body_that_stops_arriving_gets_a_json_408_and_a_vanishing_one_no_traceback(stub_server):
    _, server = stub_server
    body = json.dumps({"query": "q", "texts": ["a"]}).encode()
    with Records() as log:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as raw:
            raw.sendall(_post_head("/rerank", body, server.port) + body[:5])
            status, headers, answer = _http_response(raw)
            assert status == 408 and json.loads(answer)["error_type"] == "Timeout"
            assert headers["connection"] == "close"
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as raw:
            raw.sendall(_post_head("/rerank", body, server.port) + body[:5])
        deadline = time.monotonic() + 30
        while not any(" POST /rerank 499 " in r.getMessage() for r in log.records):
            assert time.monotonic() < deadline, log.text()
            time.sleep(0.05)
    assert not any(r.exc_info or "Exception in ASGI" in r.getMessage() for r in log.records), log.text()


# --- shutdown --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stub_server", [{"graceful_timeout": 3.0, "keep_alive_timeout": 30.0}], indirect=True)
def test_shutdown_answers_in_json_and_closes_idle_connections_cleanly(stub_server):
    """During the graceful shutdown a request on an idle keep-alive connection gets a JSON 503 with `Connection:
    close`, then a clean end of stream; a request still unanswered at --graceful-timeout gets a JSON 503 (not
    uvicorn's plain-text 500), with no traceback in the log."""
    stub, server = stub_server
    answers = []
    with Records() as log:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        idle.sendall(f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        assert _http_response(idle)[0] == 200
        stub.gate.clear()
        slow = threading.Thread(target=lambda: answers.append(httpx.post(
            server.url + "/rerank", json={"query": "q", "texts": ["slow"]}, timeout=60)))
        slow.start()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            _wait_for(client, lambda h: h["scoring_docs"] == 1)
        server.server.should_exit = True
        deadline = time.monotonic() + 30
        while True:  # until the listening socket is closed
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            except OSError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = json.dumps({"query": "q", "texts": ["late"]}).encode()
        idle.sendall(_post_head("/rerank", body, server.port) + body)
        status, headers, answer = _http_response(idle)
        assert status == 503 and json.loads(answer)["error"] == "the server is shutting down"
        assert headers["connection"] == "close" and idle.recv(1024) == b""
        idle.close()
        slow.join(60)
        server.thread.join(60)
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json() == {"error": "the server shut down before this request was answered",
                                 "error_type": "Unhealthy"}
    assert not any(r.exc_info or "Exception in ASGI" in r.getMessage() for r in log.records), log.text()
    assert stub.scored == []


def _start(args, env=None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "sce_jax.serve", *args], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


class LogReader:
    def __init__(self, process):
        self.lines, self.port = [], None
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process):
        for line in process.stderr:
            self.lines.append(line)
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match[1])


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tiny_sparse_dir, encoder):
    process = _start(["--model", str(tiny_sparse_dir), "--port", "0", "--no-warmup", "--max-length", str(MAX_LENGTH),
                      "--max-query-length", str(MAX_QUERY_LENGTH), "--max-wait-ms", "1500"])
    log = LogReader(process)
    try:
        deadline = time.monotonic() + 120
        while not log.port:
            assert time.monotonic() < deadline and process.poll() is None, "".join(log.lines)
            time.sleep(0.05)
        url = f"http://127.0.0.1:{log.port}"
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
            assert_batch_close(_by_index(answer.json()), encoder.score(query, texts))
        # uvicorn re-raises the signal once it has shut down gracefully (a shell sees 143).
        assert process.wait(60) == -signal.SIGTERM
        log.thread.join(10)
        assert any("shutting down" in line for line in log.lines) and any("stopped" in line for line in log.lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_two_servers_started_on_one_port_at_once_one_serves_the_other_says_so(tiny_sparse_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--model", str(tiny_sparse_dir), "--port", str(port), "--no-warmup", "--max-length", str(MAX_LENGTH)]
    processes = [_start(args), _start(args)]
    logs = [LogReader(p) for p in processes]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in processes):
            assert time.monotonic() < deadline, [log.lines for log in logs]
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(processes) if p.poll() is not None)
        winner = 1 - loser
        assert processes[loser].wait() == 2
        logs[loser].thread.join(10)
        assert logs[loser].lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"]
        while logs[winner].port is None:
            assert time.monotonic() < deadline and processes[winner].poll() is None, logs[winner].lines
            time.sleep(0.05)
        answer = httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": "q", "texts": ["a"]}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


# --- who may call: the API key; what it did: metrics -------------------------------------------------------------


@pytest.mark.parametrize("stub_server", [{"api_key": KEY}], indirect=True)
def test_api_key_is_required_everywhere_but_the_probes_and_never_logged(stub_server):
    _, server = stub_server
    good = {"authorization": f"Bearer {KEY}"}
    body = {"query": "q", "texts": ["a"]}
    with Records() as log, httpx.Client(base_url=server.url, timeout=30) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                        {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}x"}):
            for method, path in (("POST", "/rerank"), ("POST", "/v1/rerank"), ("POST", "/v2/rerank"),
                                 ("GET", "/metrics"), ("GET", "/nope")):
                answer = client.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (headers, path, answer.text)
                assert answer.json()["error_type"] == "Unauthorized" and answer.headers["www-authenticate"] == "Bearer"
        for path in ("/health", "/ready"):
            assert client.get(path).status_code == 200
        assert client.post("/rerank", json=body, headers=good).status_code == 200
        assert client.post("/v2/rerank", json={"query": "q", "documents": ["a"]},
                           headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/nope", headers=good).status_code == 404
    assert log.records and KEY not in log.text()


def test_settings_take_the_key_from_the_environment_and_warn_beyond_loopback(monkeypatch, caplog, capsys):
    monkeypatch.setenv("SCE_JAX_API_KEY", KEY)
    assert settings_from(parse_args(["--model", "m"])).api_key == KEY
    assert settings_from(parse_args(["--model", "m", "--api-key", "other"])).api_key == "other"
    assert KEY not in repr(settings_from(parse_args(["--model", "m"])))
    monkeypatch.setenv("SCE_JAX_API_KEY", "has space")
    assert run_cli(main, ["--model", "m", "--port", "0"]) == 2
    assert "has space" not in capsys.readouterr().err
    monkeypatch.delenv("SCE_JAX_API_KEY")
    with caplog.at_level(logging.WARNING, logger="sce_jax.serve"):
        assert run_cli(main, ["--model", "/nonexistent/model", "--host", "0.0.0.0", "--port", "0"]) == 2
        assert any("beyond loopback without an API key" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert run_cli(main, ["--model", "/nonexistent/model", "--port", "0"]) == 2
        assert not any("beyond loopback" in r.getMessage() for r in caplog.records)


def test_metrics_count_requests_documents_batches_and_latency(stub_server):
    from prometheus_client.parser import text_string_to_metric_families

    _, server = stub_server
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for texts in (["a", "bb"], ["a", "b", "c"]):
            assert client.post("/rerank", json={"query": "q", "texts": texts}).status_code == 200
        assert client.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
        assert client.post("/rerank", json={"query": "", "texts": ["a"]}).status_code == 422
        assert client.get("/no/such/path").status_code == 404
        text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("sce_jax_requests_total", endpoint="/rerank", status="200") == 2
    assert value("sce_jax_requests_total", endpoint="/rerank", status="422") == 1
    assert value("sce_jax_requests_total", endpoint="/v2/rerank", status="200") == 1
    assert value("sce_jax_requests_total", endpoint="other", status="404") == 1
    assert value("sce_jax_documents_total", endpoint="/rerank", status="200") == 5
    assert value("sce_jax_request_duration_seconds_count", endpoint="/rerank") == 3
    assert value("sce_jax_batch_documents_count") == 3 and value("sce_jax_batch_documents_sum") == 6
    assert value("sce_jax_batch_requests_sum") == 3
    assert value("sce_jax_queue_documents") == 0 and value("sce_jax_requests_in_flight") == 1
    assert ("process_resident_memory_bytes", ()) in samples or sys.platform != "linux"


# --- the command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--model", "/nonexistent/model"], "'/nonexistent/model' not found"),
    (["--model", "m", "--bogus"], "unrecognized arguments"),
    (["--model", "m", "--max-docs-per-request", "10", "--max-queue-docs", "5"], "could never be queued"),
    (["--model", "m", "--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--model", "m", "--port", "70000"], "--port"),
    (["--model", "m", "--header-timeout", "0"], "--header-timeout"),
    (["--model", "m", "--body-timeout", "nan"], "--body-timeout"),
    (["--model", "m", "--max-connections", "0"], "--max-connections"),
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
