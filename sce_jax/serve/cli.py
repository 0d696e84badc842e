"""The command line: `python -m sce_jax.serve --model M [--host 127.0.0.1] [--port 8080] ...`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket

from sce_jax.errors import InputError
from sce_jax.serve.checks import ServeSettings, served_model_name

logger = logging.getLogger("sce_jax.serve")

# The API key's environment variable (TEI reads API_KEY, vLLM VLLM_API_KEY, infinity INFINITY_API_KEY).
API_KEY_ENV = "SCE_JAX_API_KEY"
# uvicorn's listen backlog.
BACKLOG = 2048


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(prog="python -m sce_jax.serve",
                                     description="An HTTP re-ranking server (TEI's /rerank, Cohere's /v1 and /v2 "
                                                 "/rerank); see docs/serve.md.")
    parser.add_argument("--model", required=True, help="converted sce_jax directory, Hugging Face directory or hub id")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name in answers (default: the model directory's name, or the hub id)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port; the log names it)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health and /ready "
                             f"(default: ${API_KEY_ENV}; prefer it: a flag shows in the process list)")
    parser.add_argument("--max-batch-docs", type=int, default=defaults.max_batch_docs,
                        help="documents per scoring call, gathered from concurrent requests")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long an idle server waits for more requests to batch with the first")
    parser.add_argument("--max-docs-per-request", type=int, default=defaults.max_docs_per_request,
                        help="more documents in one request: 413")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies: 413")
    parser.add_argument("--max-queue-docs", type=int, default=defaults.max_queue_docs,
                        help="documents admitted and not yet scored; beyond: 503 (backpressure)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="open connections; a request on one beyond: 503")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds for a request head to arrive (from connecting, or from the previous answer)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="seconds for a request body to arrive after its head; then 408")
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="documents per forward pass")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per query-document input (default: the model's positions)")
    parser.add_argument("--max-query-length", type=int, default=32, help="query wordpieces + 2 [SEP]")
    parser.add_argument("--max-p", action="store_true",
                        help="score over-long documents by their best 50%%-overlapping chunk instead of truncating")
    parser.add_argument("--attention-impl", default="auto", help="auto, cpu, xla, dense, pallas or triton")
    parser.add_argument("--dtype", default="float32",
                        help="float32, tf32 (TF32 matmuls on GPU), bfloat16 or int8 (docs/int8.md)")
    parser.add_argument("--no-warmup", action="store_true", help="ready at once, compile on first use")
    parser.add_argument("--graceful-timeout", type=float, default=defaults.graceful_timeout,
                        help="seconds to finish in-flight requests after SIGTERM")
    parser.add_argument("--api-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()

    def error(message):  # one line through run_cli instead of argparse's usage + exit
        raise InputError(message)

    parser.error = error
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> ServeSettings:
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise InputError(f"--log-level must be debug, info, warning or error, got {args.log_level!r}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be positive, got {args.max_connections}")
    for name in ("header_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    settings = ServeSettings(
        max_batch_docs=args.max_batch_docs, max_wait_ms=args.max_wait_ms,
        max_docs_per_request=args.max_docs_per_request, max_request_bytes=args.max_request_bytes,
        max_queue_docs=args.max_queue_docs, batch_size=args.batch_size, max_p=args.max_p,
        model_name=args.served_model_name or served_model_name(args.model), body_timeout=args.body_timeout,
        graceful_timeout=args.graceful_timeout, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        api_docs=args.api_docs,
    )
    settings.check()
    return settings


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening at once, so that the port is this process's from here on: a second server
    started on it fails here, with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: a restart can bind while old connections linger in TIME_WAIT (not while another listens).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def load_encoder(args: argparse.Namespace):
    from sce_jax.encoder import load_for_command

    return load_for_command(args.model, max_length=args.max_length, max_query_length=args.max_query_length,
                            attention_impl=args.attention_impl, dtype=args.dtype)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sce_jax").setLevel(args.log_level.upper())
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise InputError(f"the server needs FastAPI, uvicorn and prometheus_client: pip install 'sce-jax[serve]' "
                         f"({error})") from None
    from sce_jax.serve.app import create_app
    from sce_jax.serve.http11 import make_server

    sock = listen(args.host, args.port)
    with sock:
        if settings.api_key is None and not is_loopback(sock):
            logger.warning("listening on %s beyond loopback without an API key: anyone who reaches this port can use "
                           "the server (set %s or --api-key)", args.host, API_KEY_ENV)
        app = create_app(load_encoder(args), settings, warmup=not args.no_warmup)
        server = make_server(app, max_connections=args.max_connections, header_timeout=args.header_timeout,
                             keep_alive_timeout=args.keep_alive_timeout, log_level=args.log_level.lower())
        # After SIGTERM/SIGINT and a graceful shutdown, uvicorn re-raises the signal: the exit status says so (143).
        server.run(sockets=[sock])
    return 0
