"""An HTTP re-ranking server: `python -m sce_jax.serve --model M [--host 127.0.0.1] [--port 8080]`.

Endpoints (JSON; see docs/serve.md):
- `POST /rerank`: text-embeddings-inference's shape, `{"query", "texts", "raw_scores"?, "return_text"?, "truncate"?}`
  -> `[{"index", "score", "text"?}, ...]` by descending score.
- `POST /v1/rerank`: Cohere/Jina's shape, `{"query", "documents": [str | {"text"}], "top_n"?, "return_documents"?,
  "model"?}` -> `{"id", "model", "results": [{"index", "relevance_score", "document"?}]}`.
- `GET /health`: the process is up (and what it is doing); `GET /ready`: 200 once the model is loaded and warmed up.

Documents of concurrent requests are scored together (`Batcher`): one `SparseCrossEncoder.score_pairs` call per
group, each request with its own query, so a document's score does not depend on its batch mates. Requirements:
`pip install 'sce-jax[serve]'` (FastAPI, uvicorn).
"""

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from sce_jax.cache import enable_compilation_cache
from sce_jax.errors import InputError, SettingsError, run_cli

logger = logging.getLogger("sce_jax.serve")


# An over-large request body is read (and dropped) up to this size before the 413 goes out.
DRAIN_BYTES = 64 << 20

# --- settings and request checks (pure; no web framework needed) ----------------------------------------------


@dataclasses.dataclass
class ServeSettings:
    max_batch_docs: int = 256  # documents per scoring call, from as many queued requests as fit
    max_wait_ms: float = 10.0  # how long an idle batcher waits for more requests before scoring
    max_docs_per_request: int = 1000  # more -> 413
    max_request_bytes: int = 4 << 20  # larger bodies -> 413
    max_queue_docs: int = 4096  # documents waiting to be scored; more -> 503
    batch_size: int = 32  # documents per forward pass (SparseCrossEncoder.score_pairs)
    max_p: bool = False  # score over-long documents by their best chunk instead of truncating them
    model_name: str = ""  # reported in /v1/rerank answers

    def check(self) -> None:
        for name in ("max_batch_docs", "max_docs_per_request", "max_request_bytes", "max_queue_docs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_docs_per_request > self.max_queue_docs:
            raise InputError(f"--max-docs-per-request ({self.max_docs_per_request}) exceeds --max-queue-docs "
                             f"({self.max_queue_docs}): such requests could never be queued")


class ApiError(Exception):
    """An answer other than 200: HTTP status, message, and TEI's `error_type`."""

    def __init__(self, status: int, message: str, error_type: str = "Validation"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid of float32 logits (TEI's and Cohere's scores in [0, 1])."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def ranked_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; equal scores keep input order."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def validation_message(errors: Sequence[dict]) -> str:
    """One line for pydantic's validation errors: where (`texts[2]`), what, and how many more."""
    first = errors[0]
    where, loc = "", list(first.get("loc", ()))
    if loc[:1] == ["documents"] and len(loc) >= 2:  # a union: name what is allowed, not each alternative
        return (f"documents[{loc[1]}]: expected a string or an object with a string \"text\""
                + (f" (and {len(errors) - 2} more errors)" if len(errors) > 2 else ""))
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where or 'body'}: {first.get('msg', 'invalid')}{more}"


def check_documents(query: str, docs: Sequence[str], settings: ServeSettings) -> None:
    if not query.strip():
        raise ApiError(422, "query is empty")
    if not docs:
        raise ApiError(422, "no documents to rank")
    if len(docs) > settings.max_docs_per_request:
        raise ApiError(413, f"{len(docs)} documents exceed the limit of {settings.max_docs_per_request} per request")


def over_long(encoder, query: str, docs: Sequence[str]) -> list[int]:
    """Indices of `docs` that do not fit in the model's max_length with `query` (they would be truncated)."""
    tokenizer = encoder.tokenizer
    query_tokens = tokenizer.encode_queries([query])[0]
    budget = tokenizer.doc_budget(query_tokens)
    pieces = tokenizer.encode_docs([query_tokens] * len(docs), docs, truncate=False)
    return [i for i, ids in enumerate(pieces) if len(ids) > budget]


# --- dynamic batching -----------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclasses.dataclass
class Job:
    query: str
    docs: list[str]
    future: concurrent.futures.Future
    arrived: float


def take_group(sizes: Sequence[int], max_docs: int) -> int:
    """How many of the queued jobs (document counts `sizes`, in arrival order) the next scoring call takes:
    the longest prefix within `max_docs` documents, and at least one job."""
    total, count = 0, 0
    for size in sizes:
        if count and total + size > max_docs:
            break
        total += size
        count += 1
    return count


class Batcher:
    """Scores queued requests in groups on one worker thread.

    A group is the longest prefix of the queue within `max_batch_docs` documents (at least one request); an idle
    worker waits up to `max_wait_ms` after the first request for more to arrive. Each request keeps its own query
    in the `score_pairs` call, so its documents are packed and scored as they would be alone. The queue holds at
    most `max_queue_docs` documents; `submit` raises QueueFull beyond that.
    """

    def __init__(self, encoder, settings: ServeSettings):
        self.encoder = encoder
        self.settings = settings
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued_docs = 0
        self._scoring_docs = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sce-jax-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_docs(self) -> int:
        return self._queued_docs

    @property
    def scoring_docs(self) -> int:
        return self._scoring_docs

    def submit(self, query: str, docs: list[str]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise Closed()
            if self._queued_docs + len(docs) > self.settings.max_queue_docs:
                raise QueueFull()
            self._jobs.append(Job(query, docs, future, time.monotonic()))
            self._queued_docs += len(docs)
            self._cond.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, score the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next_group(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._closing:
                self._cond.wait()
            if not self._jobs:
                return None
            deadline = self._jobs[0].arrived + self.settings.max_wait_ms / 1000
            while (self._queued_docs < self.settings.max_batch_docs and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            count = take_group([len(job.docs) for job in self._jobs], self.settings.max_batch_docs)
            group = [self._jobs.popleft() for _ in range(count)]
            docs = sum(len(job.docs) for job in group)
            self._queued_docs -= docs
            self._scoring_docs = docs
            return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            try:
                scores = self.encoder.score_pairs(
                    [job.query for job in group],
                    [doc for job in group for doc in job.docs],
                    [q for q, job in enumerate(group) for _ in job.docs],
                    batch_size=self.settings.batch_size,
                    max_p=self.settings.max_p,
                    progress=False,
                )
            except Exception as error:  # every request of the group gets the error (a 500)
                logger.exception("scoring failed")
                for job in group:
                    job.future.set_exception(error)
            else:
                start = 0
                for job in group:
                    job.future.set_result(scores[start : start + len(job.docs)])
                    start += len(job.docs)
            finally:
                self._scoring_docs = 0


def warm_up(encoder, settings: ServeSettings) -> float:
    """Compile the common shapes before the first request: passages and documents of several lengths, alone and
    in full batches. Returns the seconds it took."""
    start = time.monotonic()
    max_length = encoder.tokenizer.max_length
    lengths = sorted({n for n in (24, 48, 96, 160, 256, 384, max_length) if n <= max_length})
    # "a" is one wordpiece in BERT vocabularies; other tokenizers land on other lengths, which is harmless.
    # Two full batches per length compile the full-batch shapes; 1 and 8 documents some of the partial ones.
    for count in sorted({min(n, settings.max_batch_docs) for n in (1, 8, 2 * settings.batch_size)}):
        for length in lengths:
            docs = [" ".join(["a"] * (length - 8 - i % 7)) for i in range(count)]
            encoder.score_pairs(["warm up"], docs, [0] * count, batch_size=settings.batch_size,
                                max_p=settings.max_p, progress=False)
    return time.monotonic() - start


# --- the web application ----------------------------------------------------------------------------------------


def create_app(encoder, settings: ServeSettings, *, warmup: bool = True):
    """The FastAPI application around a loaded `SparseCrossEncoder` (warm-up runs in a thread at start-up)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

    class RerankRequest(BaseModel):  # text-embeddings-inference
        model_config = ConfigDict(extra="ignore")
        query: StrictStr
        texts: list[StrictStr]
        raw_scores: StrictBool = False
        return_text: StrictBool = False
        truncate: StrictBool = True
        truncation_direction: StrictStr = "right"

    class Document(BaseModel):
        model_config = ConfigDict(extra="ignore")
        text: StrictStr

    class CohereRequest(BaseModel):  # Cohere / Jina
        model_config = ConfigDict(extra="ignore")
        query: StrictStr
        documents: list[StrictStr | Document]
        top_n: StrictInt | None = None
        return_documents: StrictBool = False
        model: StrictStr | None = None
        raw_scores: StrictBool = False
        truncate: StrictBool = True

    state = {"ready": False, "draining": False, "in_flight": 0, "warmup_s": None}
    batcher = Batcher(encoder, settings)

    def warm() -> None:
        if warmup:
            try:
                state["warmup_s"] = warm_up(encoder, settings)
            except Exception:
                logger.exception("warm-up failed; the server stays unready")
                return
            logger.info("warm-up compiled %d batch shapes in %.1f s", len(encoder.compiled_shapes),
                        state["warmup_s"])
        state["ready"] = True
        logger.info("ready")

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=warm, name="sce-jax-warmup", daemon=True).start()
        yield
        state["draining"] = True
        await asyncio.to_thread(batcher.close)
        logger.info("stopped")

    app = FastAPI(title="sce_jax re-ranker", lifespan=lifespan)
    app.state.serve = state
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        start = time.perf_counter()
        state["in_flight"] += 1
        try:
            response = await call_next(request)
        finally:
            state["in_flight"] -= 1
        docs = getattr(request.state, "docs", "-")
        logger.info("%s %s %s %d docs=%s %.1fms", request.client.host if request.client else "-", request.method,
                    request.url.path, response.status_code, docs, 1000 * (time.perf_counter() - start))
        return response

    async def read_json(request: Request, model):
        """The body parsed into `model`: 413 beyond max_request_bytes (kept no further), 422 if malformed."""
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        body, received = bytearray(), 0
        # An over-large body is read on (up to DRAIN_BYTES) but not kept, so that the client, still sending,
        # gets the 413 rather than a broken connection.
        async for chunk in request.stream():
            received += len(chunk)
            if not too_big:
                body += chunk
                if received > limit:
                    too_big, body = True, bytearray()
            if too_big and received > DRAIN_BYTES:
                break
        if too_big:
            size = int(declared) if declared is not None and declared.isdigit() else received
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as error:
            raise ApiError(422, validation_message(error.errors())) from None

    async def score(request: Request, query: str, docs: list[str], truncate: bool) -> np.ndarray:
        request.state.docs = len(docs)
        check_documents(query, docs, settings)
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", "Unhealthy")
        if not state["ready"]:
            raise ApiError(503, "the model is warming up; retry shortly (GET /ready)", "Unhealthy")
        if not truncate and not settings.max_p:
            too_long = await asyncio.to_thread(over_long, encoder, query, docs)
            if too_long:
                raise ApiError(413, f"documents {too_long[:5]} exceed max_length {encoder.tokenizer.max_length} "
                               "tokens with the query (send \"truncate\": true to truncate them)")
        try:
            future = batcher.submit(query, docs)
        except QueueFull:
            raise ApiError(503, f"the queue is full ({settings.max_queue_docs} documents); retry later",
                           "Overloaded") from None
        except Closed:
            raise ApiError(503, "the server is shutting down", "Unhealthy") from None
        try:
            return await asyncio.wrap_future(future)
        except Exception as error:  # logged with its traceback by the batcher
            raise ApiError(500, f"scoring failed: {type(error).__name__}: {error}", "Backend") from None

    @app.post("/rerank")
    async def rerank(request: Request):
        body = await read_json(request, RerankRequest)
        if body.truncation_direction.lower() != "right":
            raise ApiError(422, "truncation_direction: only 'right' is supported")
        logits = await score(request, body.query, body.texts, body.truncate)
        scores = logits.astype(np.float64) if body.raw_scores else sigmoid(logits)
        results = []
        for i in ranked_order(logits).tolist():
            results.append({"index": i, "score": float(scores[i])})
            if body.return_text:
                results[-1]["text"] = body.texts[i]
        return results

    @app.post("/v1/rerank")
    async def rerank_v1(request: Request):
        body = await read_json(request, CohereRequest)
        if body.top_n is not None and body.top_n < 1:
            raise ApiError(422, f"top_n must be positive, got {body.top_n}")
        docs = [doc if isinstance(doc, str) else doc.text for doc in body.documents]
        logits = await score(request, body.query, docs, body.truncate)
        scores = logits.astype(np.float64) if body.raw_scores else sigmoid(logits)
        results = []
        for i in ranked_order(logits)[: body.top_n].tolist():
            results.append({"index": i, "relevance_score": float(scores[i])})
            if body.return_documents:
                results[-1]["document"] = {"text": docs[i]}
        return {"id": uuid.uuid4().hex, "model": settings.model_name, "results": results}

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": state["ready"], "draining": state["draining"],
                "in_flight": state["in_flight"] - 1, "queued_docs": batcher.queued_docs,
                "scoring_docs": batcher.scoring_docs, "compiled_shapes": len(encoder.compiled_shapes)}

    @app.get("/ready")
    async def ready():
        if state["ready"] and not state["draining"]:
            return {"status": "ready"}
        raise ApiError(503, "shutting down" if state["draining"] else "warming up", "Unhealthy")

    return app


# --- command line -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(prog="python -m sce_jax.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="converted sce_jax directory, Hugging Face directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port; the log names it)")
    parser.add_argument("--max-batch-docs", type=int, default=defaults.max_batch_docs,
                        help="documents per scoring call, gathered from concurrent requests")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long an idle server waits for more requests to batch with the first")
    parser.add_argument("--max-docs-per-request", type=int, default=defaults.max_docs_per_request,
                        help="more documents in one request: 413")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies: 413")
    parser.add_argument("--max-queue-docs", type=int, default=defaults.max_queue_docs,
                        help="documents waiting to be scored; beyond: 503 (backpressure)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="concurrent connections; beyond: 503 from uvicorn")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="documents per forward pass")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per query-document input (default: the model's positions)")
    parser.add_argument("--max-query-length", type=int, default=32, help="query wordpieces + 2 [SEP]")
    parser.add_argument("--max-p", action="store_true",
                        help="score over-long documents by their best 50%%-overlapping chunk instead of truncating")
    parser.add_argument("--attention-impl", default="auto", help="auto, cpu, xla, dense or pallas")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or int8 (docs/int8.md)")
    parser.add_argument("--no-warmup", action="store_true", help="ready at once, compile on first use")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds to finish in-flight requests after SIGTERM")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()

    def error(message):  # one line through run_cli instead of argparse's usage + exit
        raise InputError(message)

    parser.error = error
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise InputError(f"--log-level must be debug, info, warning or error, got {args.log_level!r}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sce_jax").setLevel(args.log_level.upper())
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    settings = ServeSettings(
        max_batch_docs=args.max_batch_docs, max_wait_ms=args.max_wait_ms,
        max_docs_per_request=args.max_docs_per_request, max_request_bytes=args.max_request_bytes,
        max_queue_docs=args.max_queue_docs, batch_size=args.batch_size, max_p=args.max_p, model_name=args.model,
    )
    settings.check()
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be positive, got {args.max_connections}")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise InputError(f"the server needs FastAPI and uvicorn: pip install 'sce-jax[serve]' ({error})") from None

    # Bind here, so that a taken port or a bad address is one error line, before anything runs.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        raise InputError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None

    from sce_jax.encoder import SparseCrossEncoder

    try:
        encoder = SparseCrossEncoder.load(args.model, max_length=args.max_length,
                                          max_query_length=args.max_query_length,
                                          attention_impl=args.attention_impl, dtype=args.dtype)
    except SettingsError as error:
        sock.close()
        raise InputError(f"--{error.setting.replace('_', '-')}: {error}") from None
    except InputError:
        sock.close()
        raise
    except (OSError, ValueError) as error:
        sock.close()
        raise InputError(f"cannot load model {args.model!r}: {error}") from None
    app = create_app(encoder, settings, warmup=not args.no_warmup)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    # Printed whatever the log level: scripts read the port from it (--port 0).
                    print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: answer 503 to new requests on open connections; uvicorn stops accepting
            # connections and waits for in-flight requests (up to --graceful-timeout).
            app.state.serve["draining"] = True
            logger.info("shutting down: finishing %d in-flight requests", max(0, app.state.serve["in_flight"]))
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                            limit_concurrency=args.max_connections,
                            timeout_graceful_shutdown=args.graceful_timeout)
    # After SIGTERM/SIGINT and a graceful shutdown, uvicorn re-raises the signal: the exit status says so (143).
    Server(config).run(sockets=[sock])
    return 0


def cli() -> None:
    """The `sce-jax-serve` console script."""
    enable_compilation_cache()  # compiled programs are reused by the next run (docs/architecture.md)
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
