"""An HTTP re-ranking server: `python -m sce_jax.serve --model M [--host 127.0.0.1] [--port 8080]`.

Endpoints (JSON; see docs/serve.md):
- `POST /rerank`: text-embeddings-inference's shape, `{"query", "texts", "raw_scores"?, "return_text"?, "truncate"?}`
  -> `[{"index", "score", "text"?}, ...]` by descending score.
- `POST /v1/rerank`, `POST /v2/rerank`: Cohere's shapes (v1 also Jina's), `{"query", "documents": [str | {"text"}],
  "top_n"?, "return_documents"?, "max_tokens_per_doc"?, "model"?}` -> `{"id", "model", "results": [{"index",
  "relevance_score", "document"?}], "meta"}`.
- `GET /health`: the process is up (and what it is doing); `GET /ready`: 200 once the model is loaded and warmed
  up; `GET /metrics`: Prometheus metrics.

Scores are the sigmoid of the model's logits unless a request sends `"raw_scores": true`. Documents of concurrent
requests are scored together (`Batcher`), each request with its own query. Requirements: `pip install
'sce-jax[serve]'` (FastAPI, uvicorn, prometheus_client).

Modules, each importing only those before it: `checks` (settings, error bodies, request checks), `tokens`
(texts -> token rows), `batcher`, `warmup`, `observe` (API key, log, metrics), `app` (the endpoints), `http11`
(connection limits, the uvicorn server), `cli`.
"""

from sce_jax.cache import enable_compilation_cache
from sce_jax.errors import run_cli
from sce_jax.serve.app import create_app
from sce_jax.serve.checks import ApiError, ServeSettings
from sce_jax.serve.cli import build_parser, main


def cli() -> None:
    """The `sce-jax-serve` console script."""
    enable_compilation_cache()  # compiled programs are reused by the next start (docs/architecture.md)
    raise SystemExit(run_cli(main))


__all__ = ["ApiError", "ServeSettings", "build_parser", "cli", "create_app", "main"]
