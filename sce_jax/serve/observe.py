"""Around every request: the API key, the log line, Prometheus metrics, and a JSON answer whatever goes wrong."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from sce_jax.serve.checks import PROBES, error_bytes

logger = logging.getLogger("sce_jax.serve")

# Paths with their own metrics label; any other path is counted as "other" (labels must not grow with input).
ENDPOINTS = ("/rerank", "/v1/rerank", "/v2/rerank", "/health", "/ready", "/metrics", "/docs", "/redoc",
             "/openapi.json")
# Logged at DEBUG: probes and scrapes come every few seconds.
QUIET = (*PROBES, "/metrics")
# nginx's status for a request whose client closed the connection before the answer (nothing is sent).
CLIENT_CLOSED = 499


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per application)."""

    def __init__(self, *, queued: Callable[[], float], in_flight: Callable[[], float],
                 compiled: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("sce_jax_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.documents = Counter("sce_jax_documents", "Documents in re-ranking requests by endpoint and status",
                                 ["endpoint", "status"], registry=registry)
        self.latency = Histogram("sce_jax_request_duration_seconds", "Seconds from request to answer", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=registry)
        powers = tuple(float(1 << n) for n in range(12))
        self.batch_docs = Histogram("sce_jax_batch_documents", "Documents per scoring call", buckets=powers,
                                    registry=registry)
        self.batch_requests = Histogram("sce_jax_batch_requests", "Requests per scoring call", buckets=powers[:8],
                                        registry=registry)
        self.batch_seconds = Histogram("sce_jax_batch_duration_seconds", "Seconds per scoring call",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                       registry=registry)
        Gauge("sce_jax_queue_documents", "Documents admitted and not yet scored (tokenizing or queued)",
              registry=registry).set_function(queued)
        Gauge("sce_jax_requests_in_flight", "Requests being answered", registry=registry).set_function(in_flight)
        Gauge("sce_jax_compiled_shapes", "Batch shapes compiled so far", registry=registry).set_function(compiled)
        ProcessCollector(registry=registry)

    def observe_request(self, endpoint: str, status: int, docs: int | None, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if docs is not None:
            self.documents.labels(endpoint, str(status)).inc(docs)
        self.latency.labels(endpoint).observe(seconds)

    def observe_group(self, docs: int, requests: int, seconds: float) -> None:
        self.batch_docs.observe(docs)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def authorized(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """`Authorization: Bearer KEY` with the right key, compared in constant time."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key)
    return False


async def send_error(send, status: int, message: str, error_type: str, headers=()) -> None:
    body = error_bytes(message, error_type)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The outermost ASGI layer: checks the API key (all paths but the probes), logs one line per request (probes
    and /metrics at DEBUG), counts it in the metrics, and turns whatever escapes the application into a JSON
    answer: a bug into a 500, a request cancelled at the end of the graceful shutdown into a 503.

    The application records a request's documents in `scope["sce_jax"]["docs"]`.
    """

    def __init__(self, app, *, api_key: str | None, metrics: Metrics, state: dict):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), []
        info = scope.setdefault("sce_jax", {})

        async def record(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        self.state["in_flight"] += 1
        try:
            if self.key is not None and path not in PROBES and not authorized(scope["headers"], self.key):
                await send_error(record, 401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                 "KEY'", "Unauthorized", [(b"www-authenticate", b"Bearer")])
            else:
                await self.app(scope, receive, record)
        except asyncio.CancelledError:  # uvicorn cancels what is left when --graceful-timeout runs out
            if not status:
                await send_error(record, 503, "the server shut down before this request was answered",
                                 "Unhealthy", [(b"connection", b"close")])
        except Exception:
            logger.exception("%s %s failed", scope["method"], path)
            if not status:
                await send_error(record, 500, "internal error (logged by the server)", "Backend")
        finally:
            self.state["in_flight"] -= 1
            code = status[0] if status else CLIENT_CLOSED
            seconds = time.perf_counter() - start
            self.metrics.observe_request(path if path in ENDPOINTS else "other", code, info.get("docs"), seconds)
            client = scope.get("client")
            logger.log(logging.DEBUG if path in QUIET else logging.INFO, "%s %s %s %d docs=%s %.1fms",
                       client[0] if client else "-", scope["method"], path, code, info.get("docs", "-"),
                       1000 * seconds)
