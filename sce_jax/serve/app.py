"""The web application: re-ranking endpoints in TEI's and Cohere's (v1, v2) shapes, probes, metrics."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' `Request` annotations at run time.
import asyncio
import concurrent.futures
import functools
import logging
import threading
import types
import uuid

import numpy as np

from sce_jax.errors import NonFiniteScoresError, one_line
from sce_jax.serve.batcher import Batcher, Closed, QueueFull
from sce_jax.serve.checks import (
    DRAIN_BYTES, ApiError, ServeSettings, check_documents, check_finite, ranked_order, sigmoid, validation_message,
)
from sce_jax.serve.observe import Guard, Metrics
from sce_jax.serve.tokens import prepare
from sce_jax.serve.warmup import warm_up

logger = logging.getLogger("sce_jax.serve")

HTTP_ERROR_TYPES = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}


class ClientGone(Exception):
    """The client closed its connection before its answer: nothing more is done for it."""


def request_models() -> types.SimpleNamespace:
    """The request bodies (pydantic): strict types, unknown fields ignored."""
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

    class TeiRequest(BaseModel):  # text-embeddings-inference's /rerank
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

    class CohereRequest(BaseModel):  # Cohere's /v1/rerank and /v2/rerank (and Jina's)
        model_config = ConfigDict(extra="ignore")
        query: StrictStr
        documents: list[StrictStr | Document]
        top_n: StrictInt | None = None
        return_documents: StrictBool = False
        max_tokens_per_doc: StrictInt | None = None
        model: StrictStr | None = None
        raw_scores: StrictBool = False
        truncate: StrictBool = True

    return types.SimpleNamespace(tei=TeiRequest, cohere=CohereRequest)


async def first_of(work: asyncio.Future, gone: asyncio.Future):
    """`work`'s result, or ClientGone if the client disconnects (`gone` finishes) first."""
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        return work.result()
    work.cancel()
    raise ClientGone()


async def until_disconnected(receive) -> None:
    """Returns once the client has disconnected (the request body has been read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(encoder, settings: ServeSettings, *, warmup: bool = True):
    """The ASGI application around a loaded `SparseCrossEncoder`: FastAPI inside `Guard` (API key, log, metrics).

    The warm-up runs in a thread at start-up. The result has `state` (ready, draining, in_flight), `settings`,
    `batcher` and `metrics`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    models = request_models()
    state = {"ready": False, "draining": False, "in_flight": 0, "warmup_s": None}
    batcher: Batcher | None = None
    metrics = Metrics(queued=lambda: batcher.admitted_docs + batcher.queued_docs,
                      in_flight=lambda: state["in_flight"], compiled=lambda: len(encoder.compiled_shapes))
    batcher = Batcher(encoder, settings, on_group=metrics.observe_group)
    # One thread tokenizes every request: a Hugging Face tokenizer called from several threads at once can fail
    # ("Already borrowed").
    tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sce-jax-tokenize")

    def warm() -> None:
        if warmup:
            try:
                state["warmup_s"] = warm_up(encoder, batcher, settings)
            except Closed:
                logger.info("warm-up stopped: shutting down")
                return
            except Exception:
                logger.exception("warm-up failed; the server stays unready")
                return
            logger.info("warm-up done: %d batch shapes compiled in %.1f s", len(encoder.compiled_shapes),
                        state["warmup_s"])
        state["ready"] = True
        logger.info("ready")

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=warm, name="sce-jax-warmup", daemon=True).start()
        yield
        state["draining"] = True
        finished = await asyncio.to_thread(batcher.close, settings.graceful_timeout)
        tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped" if finished else "stopped; a scoring call was still running and is abandoned")

    docs = settings.api_docs
    app = FastAPI(title="sce_jax re-ranker", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)

    def error_response(status: int, message: str, error_type: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.error_type, error.headers())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # 404, 405
        return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                              HTTP_ERROR_TYPES.get(error.status_code, "Validation"), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(422, validation_message(error.errors()), "Validation")

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        return Response(status_code=499)  # sent nowhere: the connection is gone; logged and counted as 499

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):  # logged by Guard
        return error_response(500, "internal error (logged by the server)", "Backend")

    async def read_json(request: Request, model):
        """The body parsed into `model`: 413 beyond max_request_bytes (kept no further), 408 if it does not
        arrive within body_timeout, 422 if malformed."""
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        body, received = bytearray(), 0
        # An over-large body is read on (up to DRAIN_BYTES) but not kept, so that the client, still sending,
        # gets the 413 rather than a broken connection.
        try:
            async with asyncio.timeout(settings.body_timeout):
                async for chunk in request.stream():
                    received += len(chunk)
                    if not too_big:
                        body += chunk
                        if received > limit:
                            too_big, body = True, bytearray()
                    if too_big and received > DRAIN_BYTES:
                        break
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                           "Timeout", close=True) from None
        except ClientDisconnect:
            raise ClientGone() from None
        if too_big:
            size = int(declared) if declared is not None and declared.isdigit() else received
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as error:
            raise ApiError(422, validation_message(error.errors())) from None

    def admit(docs: int) -> None:
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", "Unhealthy", close=True)
        if not state["ready"]:
            raise ApiError(503, "the model is warming up; retry shortly (GET /ready)", "Unhealthy")
        try:
            batcher.admit(docs)
        except QueueFull:
            raise ApiError(503, f"the queue is full ({settings.max_queue_docs} documents); retry later",
                           "Overloaded") from None
        except Closed:
            raise ApiError(503, "the server is shutting down", "Unhealthy", close=True) from None

    async def score(request: Request, query: str, docs: list[str], *, truncate: bool, field: str,
                    max_tokens: int | None = None) -> np.ndarray:
        """float32 logits of `docs`, tokenized on the tokenizer thread and scored by the batcher; a client that
        disconnects meanwhile is dropped (its documents are not scored if they are still queued)."""
        request.scope.setdefault("sce_jax", {})["docs"] = len(docs)
        check_documents(query, docs, settings)
        admit(len(docs))
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        job = None
        try:
            tokenize = functools.partial(prepare, encoder.tokenizer, query, docs, truncate=truncate,
                                         max_p=settings.max_p, max_tokens=max_tokens, field=field)
            prepared = await first_of(asyncio.get_running_loop().run_in_executor(tokenizer_thread, tokenize), gone)
            try:
                job = batcher.submit(prepared)
            except Closed:
                raise ApiError(503, "the server is shutting down", "Unhealthy", close=True) from None
            scores = await first_of(asyncio.wrap_future(job.future), gone)
        except (ApiError, ClientGone):
            raise
        except NonFiniteScoresError:  # its message names the model's local path: answer with the served name
            raise ApiError(500, f"model {settings.model_name or '?'} gave non-finite scores (NaN or infinity): its "
                           "weights are probably damaged", "Backend") from None
        except Exception as error:  # a scoring failure is logged with its traceback by the batcher
            if job is None:
                logger.exception("tokenizing failed")
            what = "tokenizing" if job is None else "scoring"
            raise ApiError(500, f"{what} failed: {type(error).__name__}: {one_line(error)}", "Backend") from None
        finally:
            gone.cancel()
            if job is None:
                batcher.withdraw(len(docs))
            elif not job.future.done():
                batcher.cancel(job)
        check_finite(scores, settings.model_name)
        return scores

    @app.post("/rerank")
    async def rerank(request: Request):
        """text-embeddings-inference: {query, texts, raw_scores?, return_text?, truncate?} -> [{index, score}]."""
        body = await read_json(request, models.tei)
        if body.truncation_direction.lower() != "right":
            raise ApiError(422, "truncation_direction: only 'right' is supported")
        logits = await score(request, body.query, body.texts, truncate=body.truncate, field="texts")
        scores = logits.astype(np.float64) if body.raw_scores else sigmoid(logits)
        results = []
        for i in ranked_order(logits).tolist():
            results.append({"index": i, "score": float(scores[i])})
            if body.return_text:
                results[-1]["text"] = body.texts[i]
        return results

    async def cohere(request: Request, version: str) -> dict:
        body = await read_json(request, models.cohere)
        for name in ("top_n", "max_tokens_per_doc"):
            if getattr(body, name) is not None and getattr(body, name) < 1:
                raise ApiError(422, f"{name} must be positive, got {getattr(body, name)}")
        docs = [doc if isinstance(doc, str) else doc.text for doc in body.documents]
        logits = await score(request, body.query, docs, truncate=body.truncate, field="documents",
                             max_tokens=body.max_tokens_per_doc)
        scores = logits.astype(np.float64) if body.raw_scores else sigmoid(logits)
        results = []
        for i in ranked_order(logits)[: body.top_n].tolist():
            results.append({"index": i, "relevance_score": float(scores[i])})
            if body.return_documents:
                results[-1]["document"] = {"text": docs[i]}
        return {"id": str(uuid.uuid4()), "model": settings.model_name, "results": results,
                "meta": {"api_version": {"version": version}}}

    @app.post("/v1/rerank")
    async def rerank_v1(request: Request):
        """Cohere v1 / Jina: {query, documents, top_n?, return_documents?} -> {id, model, results, meta}."""
        return await cohere(request, "1")

    @app.post("/v2/rerank")
    async def rerank_v2(request: Request):
        """Cohere v2: {model, query, documents, top_n?, max_tokens_per_doc?} -> {id, model, results, meta}."""
        return await cohere(request, "2")

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": state["ready"], "draining": state["draining"],
                "in_flight": state["in_flight"] - 1, "tokenizing_docs": batcher.admitted_docs,
                "queued_docs": batcher.queued_docs, "scoring_docs": batcher.scoring_docs,
                "compiled_shapes": len(encoder.compiled_shapes)}

    @app.get("/ready")
    async def ready():
        if state["ready"] and not state["draining"]:
            return {"status": "ready"}
        if state["draining"]:
            raise ApiError(503, "shutting down", "Unhealthy", close=True)
        raise ApiError(503, "warming up", "Unhealthy")

    @app.get("/metrics")
    async def prometheus():
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    guard = Guard(app, api_key=settings.api_key, metrics=metrics, state=state)
    guard.settings, guard.batcher, guard.metrics = settings, batcher, metrics
    return guard
