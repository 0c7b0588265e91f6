"""A small HTTP/1.1 server and pooled client on asyncio protocols + httptools (llhttp).

Why not aiohttp: a raw httptools protocol serves ~4x more small requests per core, and the hub's CPU
belongs to the ledger. The price is scope: no TLS, no upgrades/WebSockets, no trailers, no
compression. Everything here is what FSPIOP needs: JSON bodies, keep-alive, pipelining, limits.

Server: ``HttpServer(handler).start()`` calls ``await handler(Request) -> Response`` for each
request, in order per connection. A plain (``def``) handler is called straight from the parser when
nothing is queued on the connection, and its answer written at once: no task per request. Client:
``HttpClient(host, port)`` for one origin, or ``ClientPool`` keyed by origin for absolute ``http://``
URLs (outbound DFSP callbacks).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httptools

log = logging.getLogger(__name__)

__all__ = [
    "ClientPool",
    "Handler",
    "HttpClient",
    "HttpConnectionError",
    "HttpServer",
    "HttpTimeout",
    "Request",
    "Response",
]

HeaderList = list[tuple[str, str]] | dict[str, str]


@dataclass(slots=True)
class Request:
    method: str  # "GET", "POST", ...
    path: str  # percent-decoded path, without the query string
    query: dict[str, str]  # parsed query string; the last value of a repeated key wins
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    peer: str | None  # "host:port" of the client, when known


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: HeaderList = field(default_factory=list)  # extra headers; Content-Length/Date are ours
    content_type: str | None = None


Handler = Callable[[Request], Awaitable[Response]] | Callable[[Request], Response]


class HttpTimeout(asyncio.TimeoutError):
    """A client request (or waiting for a pooled connection, or connecting) ran past its limit."""


class HttpConnectionError(ConnectionError):
    """Could not connect, the peer closed or reset the connection, or it sent a malformed response."""


# --------------------------------------------------------------------------------------------------
# Shared wire helpers

_JSON = "application/json"
_CRLF = b"\r\n"
_LINGER_S = 2.0  # how long a connection closed after an error answer keeps draining input
_NO_BODY = frozenset({100, 101, 102, 103, 204, 304})  # statuses that never carry a body

# Lower-cased names of common request headers: a dict hit instead of decode() + lower().
_HEADER_NAMES: dict[bytes, str] = {
    variant: name
    for name in (
        "host",
        "content-type",
        "content-length",
        "accept",
        "date",
        "connection",
        "user-agent",
        "transfer-encoding",
        "expect",
        "fspiop-source",
        "fspiop-destination",
        "fspiop-signature",
        "fspiop-uri",
        "fspiop-http-method",
        "fspiop-encryption",
        "x-forwarded-for",
        "traceparent",
        "tracestate",
        "authorization",
        "accept-encoding",
    )
    for variant in (
        name.encode(),
        name.title().encode(),
        name.upper().encode(),
        name.title().replace("Fspiop", "FSPIOP").encode(),
    )
}

# Pre-encoded "HTTP/1.1 200 OK\r\n" lines: no formatting on the hot path.
_STATUS_LINES: dict[int, bytes] = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}

# Headers the server computes itself; a handler's copies are dropped so they cannot contradict ours.
# (Content-Type is not among them: give it either as Response.content_type or in headers, not both.)
_SERVER_OWNED = frozenset({"content-length", "date", "transfer-encoding", "connection"})
# Headers the client computes itself (Host comes from the origin).
_CLIENT_OWNED = frozenset({"content-length", "transfer-encoding", "connection", "host"})


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def _encode_headers(headers: HeaderList, owned: frozenset[str], out: list[bytes]) -> bool:
    """Append ``Name: value\\r\\n`` lines to ``out``; return True if one of them was ``Connection: close``.

    CR/LF in a name or value would let a value echoed from a peer inject headers, so it is refused.
    """
    close = False
    items: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        lower = name.lower()
        if lower in owned:
            if lower == "connection" and value.lower() == "close":
                close = True
            continue
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
            raise ValueError(f"invalid header {name!r}")
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    return close


def _error_json(status: int, message: str) -> Response:
    body = f'{{"error":{{"status":{status},"message":"{message}"}}}}'.encode()
    return Response(status, body, content_type=_JSON)


def default_too_large_response(status: int) -> Response:
    """413 (body) or 431 (header block): a small JSON body. The FSPIOP layer substitutes code 3104."""
    message = "request body too large" if status == 413 else "request header fields too large"
    return _error_json(status, message)


def default_error_response(status: int) -> Response:
    """400, 408, 500, 503: a small JSON body, never any detail from the failure itself."""
    return _error_json(status, HTTPStatus(status).phrase.lower())


# --------------------------------------------------------------------------------------------------
# Server


class _Failure:
    """A queued protocol-level answer (400/408/413/431): sent in turn after earlier responses, then close."""

    __slots__ = ("response",)

    def __init__(self, response: Response):
        self.response = response


class _Abort(Exception):
    """Raised inside a parser callback to stop parsing; the reason is already queued as a _Failure."""


class _ServerConnection(asyncio.Protocol):
    """One client connection. Parsing happens in data_received; handlers run in one task at a time."""

    __slots__ = (
        "_server",
        "_loop",
        "_transport",
        "_parser",
        "_peer",
        "_pending",
        "_task",
        "_broken",
        "_closing",
        "_in_message",
        "_in_headers",
        "_message_seq",
        "_raw_headers",
        "_raw_header_bytes",
        "_url",
        "_headers",
        "_body",
        "_body_size",
        "_since",
        "_handler_since",
        "_expired",
        "_read_paused",
        "_write_paused",
        "_linger",
    )

    _MAX_PIPELINE = 32  # parsed-but-unanswered requests before we stop reading (back-pressure)

    def __init__(self, server: HttpServer):
        self._server = server
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        self._pending: deque[tuple[Request, bool, bool] | _Failure] = deque()
        self._task: asyncio.Task[None] | None = None
        self._broken = False  # a _Failure is queued: ignore any further input
        self._closing = False
        self._in_message = False
        self._in_headers = False
        self._message_seq = 0
        self._raw_header_bytes = 0
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._since = server._now  # start of the current idle or receiving phase (for the sweeper)
        self._handler_since = 0.0  # 0 when no handler is running
        self._expired = False  # the sweeper cancelled the running handler
        self._read_paused = False
        self._write_paused = False
        self._linger: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's TCPTransport does not subclass asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        if len(server._connections) >= server.max_connections:
            # Over the limit: say so cheaply instead of silently resetting the client.
            response = server.error_response(503)
            head, _ = server._render(response, close=True, legacy=False)
            transport.write(head + response.body)
            transport.close()
            self._closing = True
            return
        server._connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        self._since = server._now

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server._connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        if self._task is not None:
            # The client is gone: nobody can read the answer, and the handler must not hold the slot.
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._broken or self._closing:
            return
        seq = self._message_seq
        was_in_headers = self._in_headers
        try:
            self._parser.feed_data(data)
        except _Abort:
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Abort) or self._broken:
                return
            log.exception("http: parser callback failed")
            self._fail(self._server.error_response(500), lost=False)
            return
        except httptools.HttpParserUpgrade:
            # Upgrades (WebSocket, h2c) are not spoken here: answer what was parsed, then close.
            self._broken = True
            self._enqueue_close_marker()
            return
        except httptools.HttpParserError:
            self._fail(self._server.error_response(400), lost=False)
            return
        # The header block is measured exactly once complete; until then count raw bytes of reads
        # spent entirely inside it, so an endless header block cannot grow without bound (the
        # overshoot is at most one read).
        if self._in_headers and was_in_headers and seq == self._message_seq:
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self._server.max_header_bytes:
                self._fail(self._server.too_large_response(431), lost=False)

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish answering what was already received, then close.
        if self._closing or (self._task is None and not self._pending):
            return None  # lets the transport close itself
        self._broken = True
        self._enqueue_close_marker()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_headers = True
        self._message_seq += 1
        self._raw_header_bytes = 0
        self._url = b""
        self._raw_headers = []
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._since = self._server._now

    def on_url(self, url: bytes) -> None:
        self._url += url  # may arrive in pieces across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hottest callback (one per header): only collect; on_headers_complete does the rest.
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        size = len(self._url)
        headers = self._headers
        for name, value in self._raw_headers:
            size += len(name) + len(value) + 4
            key = _HEADER_NAMES.get(name)
            if key is None:
                key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            previous = headers.get(key)
            headers[key] = text if previous is None else f"{previous}, {text}"
        self._raw_headers = []
        if size > self._server.max_header_bytes:
            self._fail(self._server.too_large_response(431))
        length = headers.get("content-length")
        if length is not None:
            try:
                too_large = int(length) > self._server.max_body_bytes
            except ValueError:
                too_large = False  # llhttp has already rejected a malformed Content-Length
            if too_large:
                # Refuse before reading a byte of it; the connection closes since the body is unread.
                self._fail(self._server.too_large_response(413))
        expect = self._headers.get("expect")
        expect_continue = expect is not None and expect.lower() == "100-continue"
        if expect_continue and self._task is None and not self._pending and not self._broken:
            # curl and others wait ~1 s for this before sending a body; only safe when no earlier
            # response is still owed, since an interim response must not precede those.
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._server.max_body_bytes:
            self._fail(self._server.too_large_response(413))  # chunked, or lied about its length
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        parser = self._parser
        url = httptools.parse_url(self._url)
        raw_path = url.path or b"/"
        # UTF-8 (not Latin-1) so that clients sending raw non-ASCII paths still get readable text.
        path = raw_path.decode("utf-8", "replace")
        if b"%" in raw_path:
            path = unquote(path)
        raw_query = url.query
        query = (
            dict(parse_qsl(raw_query.decode("utf-8", "replace"), keep_blank_values=True)) if raw_query else {}
        )
        body = self._body
        request = Request(
            parser.get_method().decode("ascii"),
            path,
            query,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
            self._peer,
        )
        self._body = []
        self._since = self._server._now
        # HTTP/1.0 keep-alive must be confirmed with an explicit Connection: keep-alive.
        keep_alive = parser.should_keep_alive()
        self._dispatch((request, keep_alive, keep_alive and parser.get_http_version() == "1.0"))

    # ---- request processing

    def _dispatch(self, item: tuple[Request, bool, bool] | _Failure) -> None:
        if self._closing:
            return  # answered with Connection: close while the same read held more requests
        if self._task is None and not self._pending and self._server._handler_is_sync and type(item) is tuple:
            # Nothing ahead of it on this connection: answer now, from the parser (no task, no loop turn).
            request, keep_alive, legacy = item
            response = self._call_sync(request)
            self._answer(request, response, keep_alive, legacy)
            if not self._closing:
                self._since = self._server._now
            return
        self._pending.append(item)
        if self._task is None:
            self._task = self._loop.create_task(self._run())
        elif len(self._pending) >= self._MAX_PIPELINE:
            self._update_reading()

    def _fail(self, response: Response, *, lost: bool = True) -> None:
        """Queue a final error answer (sent in order, then close) and stop reading.

        Inside a parser callback (``lost`` True) parsing must also stop, hence the raise.
        """
        if self._broken:
            if lost:
                raise _Abort
            return
        self._broken = True
        self._in_message = self._in_headers = False
        self._body = []
        self._dispatch(_Failure(response))
        self._update_reading()
        if lost:
            raise _Abort

    def _enqueue_close_marker(self) -> None:
        if self._task is None and not self._pending:
            self._close()
        else:
            self._pending.append(_Failure(Response(0)))  # status 0: nothing to send, just close

    def _call_sync(self, request: Request) -> Response:
        try:
            response = self._server.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
        except Exception:
            log.exception("http: %s %s: handler failed", request.method, request.path)
            response = self._server.error_response(500)
        return cast(Response, response)

    def _answer(self, request: Request, response: Response, keep_alive: bool, legacy: bool) -> None:
        """Write ``response`` to ``request``; close afterwards when either side asked to."""
        server = self._server
        transport = cast(asyncio.Transport, self._transport)
        close = not keep_alive or server._close_requested
        try:
            head, close = server._render(response, close=close, legacy=legacy)
        except Exception:
            log.exception("http: %s %s: unsendable response", request.method, request.path)
            response = server.error_response(500)
            head, close = server._render(response, close=close, legacy=legacy)
        if request.method == "HEAD" or response.status in _NO_BODY:
            transport.write(head)
        else:
            _write(transport, head, response.body)
        if close:
            self._close()

    async def _run(self) -> None:
        """Answer queued requests strictly in arrival order (pipelining), one handler at a time."""
        server = self._server
        handler = server.handler
        sync = server._handler_is_sync
        pending = self._pending
        transport = self._transport
        assert transport is not None
        try:
            while pending and not self._closing:
                item = pending.popleft()
                if type(item) is _Failure:
                    if item.response.status:
                        head, _ = server._render(item.response, close=True, legacy=False)
                        _write(transport, head, item.response.body)
                    self._close(linger=bool(item.response.status))
                    return
                request, keep_alive, legacy = cast(tuple[Request, bool, bool], item)
                if sync:
                    self._answer(request, self._call_sync(request), keep_alive, legacy)
                    if self._closing:
                        return
                    continue
                # The handler call is inlined, not a helper coroutine: one frame less per request.
                self._handler_since = server._now or 1.0
                try:
                    response = await handler(request)
                    if not isinstance(response, Response):
                        raise TypeError(f"handler returned {type(response).__name__}, not Response")
                except asyncio.CancelledError:
                    if not self._expired:
                        raise  # stop(), or the client went away
                    log.error("http: %s %s: handler timed out", request.method, request.path)
                    response = server.error_response(503)
                except Exception:
                    log.exception("http: %s %s: handler failed", request.method, request.path)
                    response = server.error_response(500)
                finally:
                    self._handler_since = 0.0
                if self._expired:
                    # Our cancel was consumed; undo its count so asyncio.timeout() in later handlers
                    # run by this same task still turns its own cancellations into TimeoutError.
                    self._expired = False
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                if self._closing:
                    return
                self._answer(request, response, keep_alive, legacy)
                if self._closing:
                    return
        finally:
            self._task = None
            if not self._closing:
                self._since = server._now
                self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        should_pause = self._broken or self._write_paused or len(self._pending) >= self._MAX_PIPELINE
        if should_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not should_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close(self, *, linger: bool = False) -> None:
        """Close after flushing what was written (asyncio's close() does flush).

        ``linger``: an error answer was sent while request bytes may still be unread. Closing then
        makes the kernel send RST, which can destroy the answer before the client reads it; so
        half-close instead and discard input until the client closes or _LINGER_S passes.
        """
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if linger and self._linger is None and transport.can_write_eof():
            transport.write_eof()
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._linger = self._loop.call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def _sweep(self, now: float) -> None:
        """Called about once per tick by the server: enforce receive, handler and keep-alive limits."""
        server = self._server
        if self._closing:
            return
        if self._handler_since:
            if now - self._handler_since > server.request_timeout_s and not self._expired:
                self._expired = True
                if self._task is not None:
                    self._task.cancel()
            return
        if self._in_message:
            if now - self._since > server.request_timeout_s:
                self._fail(server.error_response(408), lost=False)
        elif self._task is None and not self._pending and now - self._since > server.keepalive_timeout_s:
            self._close()


class HttpServer:
    """HTTP/1.1 server: keep-alive, pipelining, size limits, timeouts. See the module docstring."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_header_bytes: int = 65536,
        max_body_bytes: int = 5_242_880,
        request_timeout_s: float = 30.0,
        max_connections: int = 10_000,
        keepalive_timeout_s: float = 75.0,
        too_large_response: Callable[[int], Response] | None = None,
        error_response: Callable[[int], Response] | None = None,
        reuse_port: bool = False,
    ):
        """``request_timeout_s`` bounds both receiving one request and its handler (408 / 503).

        ``too_large_response(status)`` builds the 413/431 answer and ``error_response(status)`` the
        400/408/500/503 ones; both may be given here or overridden in a subclass.
        """
        self.handler = handler
        # A plain function is answered from the parser (see _ServerConnection._dispatch); an async one, or
        # an object whose __call__ is async, runs in the connection's task.
        self._handler_is_sync = not (
            inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
        )
        self.host = host
        self.port = port
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.keepalive_timeout_s = keepalive_timeout_s
        # Several ingress processes may listen on one port; the kernel spreads connections over them.
        self.reuse_port = reuse_port
        if too_large_response is not None:
            self.too_large_response = too_large_response  # type: ignore[method-assign]
        if error_response is not None:
            self.error_response = error_response  # type: ignore[method-assign]
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in start()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._now = 0.0
        self._date_line = b""
        self._date_second = -1
        self._close_requested = False
        # The sweeper's period: a fraction of the smallest limit, at most a second.
        self._tick_s = min(1.0, request_timeout_s / 4, keepalive_timeout_s / 4)

    def too_large_response(self, status: int) -> Response:
        return default_too_large_response(status)

    def error_response(self, status: int) -> Response:
        return default_error_response(status)

    async def start(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._close_requested = False
        self._now = loop.time()
        server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self.port, reuse_address=True, backlog=1024,
            reuse_port=self.reuse_port or None,
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._tick()  # no await since create_server: no connection can have been accepted yet
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection; running handlers are cancelled."""
        self._close_requested = True
        if self._server is not None:
            self._server.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        tasks = []
        for connection in list(self._connections):
            if connection._task is not None:
                tasks.append(connection._task)
                connection._task.cancel()
            connection._close()
        self._connections.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- internals

    def _tick(self) -> None:
        """Refresh the cached clock and Date header, and sweep connections for expired limits.

        One timer for the whole server instead of call_later per request keeps timers off the hot path.
        """
        now = self._loop.time()
        self._now = now
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date_line = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
        for connection in list(self._connections):
            connection._sweep(now)
        self._ticker = self._loop.call_later(self._tick_s, self._tick)

    def _render(self, response: Response, *, close: bool, legacy: bool) -> tuple[bytes, bool]:
        """Status line and headers (no body) for ``response``; also whether to close afterwards.

        ``legacy``: an HTTP/1.0 client that asked for keep-alive, which must be confirmed explicitly.
        """
        status = response.status
        parts = [_status_line(status)]
        second = int(time.time())
        if second != self._date_second:  # the ticker may lag; Date must not
            self._date_second = second
            self._date_line = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
        parts.append(self._date_line)
        if status not in _NO_BODY:  # RFC 9110: no Content-Length on 1xx/204
            parts.append(b"Content-Length: %d\r\n" % len(response.body))
        if response.content_type is not None:
            parts.append(f"Content-Type: {response.content_type}\r\n".encode("latin-1"))
        if response.headers and _encode_headers(response.headers, _SERVER_OWNED, parts):
            close = True  # the handler asked for Connection: close
        if close:
            parts.append(b"Connection: close\r\n")
        elif legacy:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        return b"".join(parts), close


def _write(transport: asyncio.Transport, head: bytes, body: bytes) -> None:
    # One write (one send syscall) for typical small answers; no 5 MB copy for big ones.
    if len(body) <= 16384:
        transport.write(head + body if body else head)
    else:
        transport.writelines((head, body))


# --------------------------------------------------------------------------------------------------
# Client


class _Stale(Exception):
    """A reused keep-alive connection was closed by the peer before any byte of the response came."""


class _ClientConnection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time (no client-side pipelining)."""

    __slots__ = (
        "_loop",
        "_parser",
        "_max_body",
        "transport",
        "closed",
        "reusable",
        "idle_since",
        "_waiter",
        "_received",
        "_status",
        "_headers",
        "_body",
        "_body_size",
        "_until_eof",
        "_head_only",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int):
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self._received = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._until_eof = False
        self._head_only = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_eof:
            # A response framed by closing the connection (no Content-Length, not chunked) ends here.
            self._finish()
        elif self._received == 0:
            waiter.set_exception(_Stale())
        else:
            waiter.set_exception(HttpConnectionError(f"connection closed mid-response: {exc or 'EOF'}"))

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for: the stream is out of step, so the connection is unusable.
            self.abort()
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # A callback's own exception (body too large) rides along as the parser error's context.
            reason = exc.__context__ if isinstance(exc.__context__, HttpConnectionError) else exc
            if not waiter.done():
                waiter.set_exception(HttpConnectionError(f"bad response: {reason}"))
            self.abort()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        if status < 200:
            return  # an interim 1xx; the final response follows
        headers = self._headers
        if self._head_only:
            # A HEAD response has no body whatever its Content-Length says; httptools cannot be told
            # that, so finish here and drop the connection instead of risking a desynchronised parser.
            self._finish(reusable=False)
        elif (
            "content-length" not in headers and "transfer-encoding" not in headers and status not in _NO_BODY
        ):
            self._until_eof = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise HttpConnectionError(f"response body over {self._max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            self._headers = {}
            return
        if not self._head_only:
            self._finish(reusable=self._parser.should_keep_alive())

    # ---- used by HttpClient

    async def exchange(
        self, head: bytes, body: bytes, *, head_only: bool
    ) -> tuple[int, dict[str, str], bytes]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise _Stale()
        self._waiter = waiter = self._loop.create_future()
        self._received = 0
        self._until_eof = False
        self._head_only = head_only
        self.reusable = False
        _write(self.transport, head, body)
        try:
            return await waiter
        finally:
            self._waiter = None

    def _finish(self, *, reusable: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self.reusable = reusable and not self.closed
            body = self._body
            waiter.set_result((self._status, self._headers, body[0] if len(body) == 1 else b"".join(body)))
        self._body = []

    def abort(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


_TOKEN_BAD = frozenset(' \t\r\n()<>@,;:\\"/[]?={}')


class HttpClient:
    """Pooled keep-alive HTTP/1.1 client for one origin (scheme http only; https not needed now).

    At most ``max_connections`` requests are in flight; others wait for a free connection within
    their ``request_timeout_s``, which covers waiting, connecting and the whole exchange. Timeouts
    raise ``HttpTimeout`` (an ``asyncio.TimeoutError``); refused/reset/closed connections and
    malformed responses raise ``HttpConnectionError`` (a ``ConnectionError``). A connection that
    failed or timed out is discarded, never reused.

    Idle connections are dropped after ``idle_timeout_s`` (below Node's 5 s keep-alive default, so we
    usually let go before the DFSP does). If a reused connection turns out to have been closed by the
    peer before any response byte, the request is sent once more on a fresh connection: the peer
    cannot have answered it, and FSPIOP callbacks are idempotent by design.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 16,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
        idle_timeout_s: float = 4.0,
        max_response_bytes: int = 5_242_880,
    ):
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_response_bytes = max_response_bytes
        authority = f"[{host}]" if ":" in host else host if host.isascii() else host.encode("idna").decode()
        self._host_line = f"Host: {authority if port == 80 else f'{authority}:{port}'}\r\n".encode("ascii")
        self._origin = f"http://{authority}:{port}"
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_ClientConnection] = deque()  # most recently used at the right
        self._all: set[_ClientConnection] = set()
        self._closed = False

    async def request(
        self, method: str, path: str, headers: HeaderList | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, lower-cased headers, body)."""
        if self._closed:
            raise HttpConnectionError(f"{self._origin}: client is closed")
        head, close = self._encode(method, path, headers, body)
        try:
            async with asyncio.timeout(self.request_timeout_s), self._slots:
                return await self._exchange(head, body, close=close, head_only=method == "HEAD")
        except TimeoutError as exc:
            if isinstance(exc, HttpTimeout):
                raise
            raise HttpTimeout(
                f"{method} {self._origin}{path}: no response within {self.request_timeout_s} s"
            ) from None

    async def close(self) -> None:
        """Close every connection; requests still in flight fail with HttpConnectionError."""
        self._closed = True
        for connection in list(self._all):
            if connection.transport is not None:
                connection.closed = True
                connection.transport.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run connection_lost before the loop may close

    # ---- internals

    def _encode(self, method: str, path: str, headers: HeaderList | None, body: bytes) -> tuple[bytes, bool]:
        """Request line and headers; also whether the caller asked for Connection: close."""
        if not method or any(c in _TOKEN_BAD for c in method):
            raise ValueError(f"invalid HTTP method {method!r}")
        if not path.isascii():
            path = quote(path, safe="/?&=%:@!$'()*+,;~#[]")
        if not path.startswith("/") or " " in path or "\r" in path or "\n" in path or "\t" in path:
            raise ValueError(f"invalid request path {path!r}")
        parts = [f"{method} {path} HTTP/1.1\r\n".encode("ascii"), self._host_line]
        if body or method in ("POST", "PUT", "PATCH"):
            parts.append(b"Content-Length: %d\r\n" % len(body))
        close = _encode_headers(headers, _CLIENT_OWNED, parts) if headers else False
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(_CRLF)
        return b"".join(parts), close

    async def _exchange(
        self, head: bytes, body: bytes, *, close: bool, head_only: bool
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self._closed:
                raise HttpConnectionError(f"{self._origin}: client is closed")
            connection, reused = self._checkout()
            if connection is None:
                connection = await self._connect()
            try:
                result = await connection.exchange(head, body, head_only=head_only)
            except _Stale:
                self._retire(connection)
                if reused and attempt == 0:
                    continue  # see the class docstring: the peer dropped an idle connection
                raise HttpConnectionError(f"{self._origin}: connection closed before a response") from None
            except BaseException:
                # Timed out, cancelled, or failed mid-exchange: the stream state is unknown.
                connection.abort()
                self._discard(connection)
                raise
            if connection.reusable and not close and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                self._retire(connection)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _checkout(self) -> tuple[_ClientConnection | None, bool]:
        idle = self._idle
        if not idle:
            return None, False
        cutoff = time.monotonic() - self.idle_timeout_s
        # Oldest first: drop those idle too long (the peer may be about to close them).
        while idle and idle[0].idle_since < cutoff:
            self._retire(idle.popleft())
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection, True
            self._retire(connection)
        return None, False

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        max_body = self.max_response_bytes
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _ClientConnection(loop, max_body), self.host, self.port
                )
        except TimeoutError:
            raise HttpTimeout(
                f"connect to {self._origin}: no answer within {self.connect_timeout_s} s"
            ) from None
        except OSError as exc:
            raise HttpConnectionError(f"connect to {self._origin}: {exc}") from exc
        if self._closed:
            connection.abort()
            raise HttpConnectionError(f"{self._origin}: client is closed")
        self._all.add(connection)
        return connection

    def _retire(self, connection: _ClientConnection) -> None:
        self._discard(connection)
        if connection.transport is not None and not connection.transport.is_closing():
            connection.transport.close()

    def _discard(self, connection: _ClientConnection) -> None:
        self._all.discard(connection)


class ClientPool:
    """One HttpClient per origin, created on demand; ``request`` takes absolute ``http://`` URLs.

    Keyword arguments are passed to every HttpClient (max_connections, timeouts, ...).
    """

    def __init__(self, **client_options: float | int):
        self._options = client_options
        self._clients: dict[tuple[str, int], HttpClient] = {}

    def client(self, host: str, port: int) -> HttpClient:
        key = (host, port)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = HttpClient(host, port, **self._options)  # type: ignore[arg-type]
        return client

    async def request(
        self, method: str, url: str, headers: HeaderList | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)  # lru-cached by the stdlib: callback URLs repeat
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"unsupported URL {url!r}: only absolute http:// URLs")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return await self.client(parts.hostname, parts.port or 80).request(method, path, headers, body)

    async def close(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.close()
