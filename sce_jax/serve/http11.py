"""The connection layer: uvicorn's HTTP/1.1 (h11) protocol with limits a public port needs, and the server.

uvicorn itself gives a connection no deadline before its first request head, nor one for a head that arrives
in part, and answers its connection limit and malformed requests in plain text. Here:
- a request head must arrive whole within `header_timeout` seconds of the connection's opening or of the previous
  answer on it; otherwise the connection is closed (after a JSON 408 if part of a head came);
- beyond `max_connections` open connections, a new connection's request gets a JSON 503 and the connection closes;
- a malformed request head (or one over h11's 16 KiB) gets a JSON 400;
- while the server drains (SIGTERM), a keep-alive connection idle between requests stays open until its
  keep-alive timeout: a request on it gets a JSON 503 with `Connection: close`, not a reset connection.
"""

from __future__ import annotations

import logging
import sys
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sce_jax.serve.checks import error_bytes, raw_error_response
from sce_jax.serve.observe import send_error

logger = logging.getLogger("sce_jax.serve")

# Seconds between warnings about refused connections.
WARN_EVERY = 10.0


async def over_capacity(scope, receive, send) -> None:
    """The application for a connection beyond the limit."""
    await send_error(send, 503, "too many open connections; retry later", "Overloaded",
                     [(b"connection", b"close"), (b"retry-after", b"1")])


class GuardedH11Protocol(H11Protocol):
    max_connections = 512
    header_timeout = 10.0
    refused = 0  # connections over the limit since the last warning (per server: see protocol_class)
    warned = -float("inf")

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_deadline = None
        if len(self.connections) > self.max_connections:
            self.app = over_capacity
            self._count_refusal()
        self._await_head()

    def _count_refusal(self) -> None:
        """One warning per WARN_EVERY seconds at most, however many connections are refused."""
        server = type(self)
        server.refused += 1
        if time.monotonic() - server.warned >= WARN_EVERY:
            logger.warning("more than --max-connections %d connections open: %d refused (503) since the last "
                           "such line", self.max_connections, server.refused)
            server.refused, server.warned = 0, time.monotonic()

    def connection_lost(self, exc) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            self.transport.write(raw_error_response(
                408, "Request Timeout", f"the request head did not arrive within {self.header_timeout:g} s",
                "Timeout"))
        logger.debug("closing a connection without a whole request head after %g s", self.header_timeout)
        self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a whole request head arrived
            self._stop_head_deadline()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_head()  # before uvicorn handles a pipelined request, which stops it again
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        body = error_bytes("malformed HTTP request (or a request head over 16 KiB)", "Validation")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def shutdown(self) -> None:
        idle = self.cycle is not None and self.cycle.response_complete and not self.conn.trailing_data[0]
        if not idle:  # in the middle of a request: uvicorn closes after its answer (or now, if none began)
            super().shutdown()


def protocol_class(*, max_connections: int, header_timeout: float) -> type[GuardedH11Protocol]:
    return type("SceJaxH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout, "refused": 0,
                 "warned": -float("inf")})


class Server(uvicorn.Server):
    """uvicorn's server: prints the address it listens on, and marks the application draining when it starts
    to shut down (then /ready and new requests get 503)."""

    def __init__(self, config: uvicorn.Config, app_state: dict):
        super().__init__(config)
        self.app_state = app_state

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", ()):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                # Printed whatever the log level: scripts read the port from it (--port 0).
                print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets=None) -> None:
        self.app_state["draining"] = True
        logger.info("shutting down: finishing %d requests in flight", max(0, self.app_state["in_flight"]))
        await super().shutdown(sockets)


def make_server(app, *, max_connections: int = 512, header_timeout: float = 10.0, keep_alive_timeout: float = 5.0,
                log_level: str = "info") -> Server:
    """The uvicorn server for `create_app`'s application (its settings give the graceful timeout); run it with
    `.run(sockets=[a listening socket])`."""
    config = uvicorn.Config(
        app, http=protocol_class(max_connections=max_connections, header_timeout=header_timeout),
        lifespan="on", log_config=None, log_level=log_level, access_log=False,
        timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=app.settings.graceful_timeout,
    )
    return Server(config, app.state)
