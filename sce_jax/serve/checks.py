"""The server's settings, its error answers and the request checks that need no model (pure; no web framework)."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sce_jax.errors import InputError

# An over-large request body is read (and dropped) up to this size before the 413 goes out.
DRAIN_BYTES = 64 << 20

# Endpoints that answer without an API key: orchestrators probe them.
PROBES = ("/health", "/ready")

# Characters that leave nothing for a tokenizer: controls (NUL, ...), format characters (zero-width spaces and
# joiners, BOM, soft hyphen), separators (spaces).
BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


@dataclasses.dataclass
class ServeSettings:
    max_batch_docs: int = 256  # documents per scoring call, from as many queued requests as fit
    max_wait_ms: float = 10.0  # how long an idle batcher waits for more requests before scoring
    max_docs_per_request: int = 1000  # more -> 413
    max_request_bytes: int = 4 << 20  # larger bodies -> 413
    max_queue_docs: int = 4096  # documents admitted and not yet scored; more -> 503
    batch_size: int = 32  # documents per forward pass (SparseCrossEncoder.score_tokens)
    max_p: bool = False  # score over-long documents by their best chunk instead of truncating them
    model_name: str = ""  # reported in /v1/rerank and /v2/rerank answers
    body_timeout: float = 30.0  # seconds to receive a request body once its head has arrived; then 408
    graceful_timeout: float = 30.0  # after SIGTERM: seconds for requests in flight, then for the scoring call
    api_key: str | None = dataclasses.field(default=None, repr=False)  # Authorization: Bearer KEY, if set
    api_docs: bool = False  # serve /docs, /redoc and /openapi.json

    def check(self) -> None:
        for name in ("max_batch_docs", "max_docs_per_request", "max_request_bytes", "max_queue_docs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        for name in ("body_timeout", "graceful_timeout"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_docs_per_request > self.max_queue_docs:
            raise InputError(f"--max-docs-per-request ({self.max_docs_per_request}) exceeds --max-queue-docs "
                             f"({self.max_queue_docs}): such requests could never be queued")
        if self.api_key is not None:
            check_api_key(self.api_key)


def check_api_key(key: str) -> None:
    """InputError unless `key` can travel in an `Authorization: Bearer` header (the message never shows it)."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise InputError("the API key (--api-key or SCE_JAX_API_KEY) must be non-empty printable ASCII without "
                         "spaces")


def served_model_name(model: str) -> str:
    """The model's name for answers: a local directory's own name (never its path), or a hub id as given."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve().name
    return model


class ApiError(Exception):
    """An answer other than 200: HTTP status, message, `error_type` (TEI's names, and a few of ours)."""

    def __init__(self, status: int, message: str, error_type: str = "Validation", *, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.close = close  # answer with `Connection: close`

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": "1"} if self.status == 503 else {}
        if self.close:
            headers["Connection"] = "close"
        return headers

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def error_bytes(message: str, error_type: str) -> bytes:
    """The JSON error body, encoded."""
    return json.dumps({"error": message, "error_type": error_type}).encode()


def raw_error_response(status: int, reason: str, message: str, error_type: str) -> bytes:
    """A whole HTTP/1.1 error answer with the JSON body and `Connection: close`, for the connection layer (which
    answers before any request exists for the application)."""
    body = error_bytes(message, error_type)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


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


def is_blank(text: str) -> bool:
    """True if `text` holds only whitespace, control or invisible format characters (NUL, zero-width spaces)."""
    return all(unicodedata.category(c) in BLANK_CATEGORIES for c in text)


def check_documents(query: str, docs: Sequence[str], settings: ServeSettings) -> None:
    if is_blank(query):
        raise ApiError(422, "query is empty (nothing but whitespace, control or invisible characters)")
    if not docs:
        raise ApiError(422, "no documents to rank")
    if len(docs) > settings.max_docs_per_request:
        raise ApiError(413, f"{len(docs)} documents exceed the limit of {settings.max_docs_per_request} per request")


def check_finite(scores: np.ndarray, model_name: str) -> None:
    """A 500 naming how many scores are NaN or infinite: a broken model's scores are never returned."""
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise ApiError(500, f"{bad} of {len(scores)} scores are not finite (NaN or infinite): model "
                       f"{model_name or '?'} is broken", "Backend")
