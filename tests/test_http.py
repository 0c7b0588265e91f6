"""api.http: the uvloop + httptools HTTP/1.1 server and pooled client, over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
import uvloop

from api.http import ClientPool, HttpClient, HttpServer, HttpTimeout, Request, Response


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Each test gets a fresh uvloop event loop, like the hub runs on."""

    async def wrapper() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await main()

    uvloop.run(wrapper())


class App:
    """A handler recording what it saw: peers, and the highest number of concurrent requests."""

    def __init__(self) -> None:
        self.peers: list[str | None] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, request: Request) -> Response:
        self.peers.append(request.peer)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self.route(request)
        finally:
            self.active -= 1

    async def route(self, request: Request) -> Response:
        if request.path == "/echo":
            return Response(200, request.body, content_type=request.headers.get("content-type"))
        if request.path == "/boom":
            raise RuntimeError("handler exploded")
        if request.path == "/sleep":
            await asyncio.sleep(float(request.query["s"]))
        if request.path == "/yield":
            await asyncio.sleep(0)
        payload = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode(),
        }
        return Response(
            200, orjson.dumps(payload), [("X-Tag", request.query.get("tag", ""))], "application/json"
        )


class SyncApp:
    """A plain (``def``) handler: the server answers it from the parser, with no task per request."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, request: Request) -> Response:
        self.paths.append(request.path)
        if request.path == "/boom":
            raise RuntimeError("handler exploded")
        if request.path == "/not-a-response":
            return "oops"  # type: ignore[return-value]
        return Response(200, request.body or request.path.encode(), [("X-Tag", request.query.get("tag", ""))])


@asynccontextmanager
async def serving(app: App | SyncApp | None = None, **options) -> AsyncIterator[HttpServer]:
    server = HttpServer(app or App(), "127.0.0.1", 0, **options)
    port = await server.start()
    assert port == server.port and port > 0
    try:
        yield server
    finally:
        await server.stop()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length framed response off a raw socket."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send raw bytes, read one response, and report whether the server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        status, headers, body = await read_response(reader)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        return status, headers, body, closed
    finally:
        writer.close()


def test_get_with_query_parsing() -> None:
    async def main() -> None:
        async with serving() as server:
            client = HttpClient("127.0.0.1", server.port)
            status, headers, body = await client.request(
                "GET", "/items/a%20b?x=1&y=hello%20world&x=2&empty=&plus=a+b", {"Accept": "application/json"}
            )
            await client.close()
        assert status == 200
        seen = orjson.loads(body)
        assert seen["method"] == "GET"
        assert seen["path"] == "/items/a b"
        assert seen["query"] == {"x": "2", "y": "hello world", "empty": "", "plus": "a b"}
        assert seen["headers"]["accept"] == "application/json"
        assert seen["headers"]["host"] == f"127.0.0.1:{server.port}"
        assert headers["content-length"] == str(len(body))
        assert headers["content-type"] == "application/json"
        assert headers["date"].endswith(" GMT")

    run(main)


def test_post_json_body_is_echoed() -> None:
    async def main() -> None:
        payload = {"transferId": "b51ec534-ee48-4575-b6a9-ead2955b8069", "amount": {"amount": "10.5"}}
        async with serving() as server:
            client = HttpClient("127.0.0.1", server.port)
            body = orjson.dumps(payload)
            status, headers, echoed = await client.request(
                "POST",
                "/echo",
                {"Content-Type": "application/vnd.interoperability.transfers+json;version=1.1"},
                body,
            )
            await client.close()
        assert status == 200
        assert orjson.loads(echoed) == payload
        assert headers["content-type"] == "application/vnd.interoperability.transfers+json;version=1.1"

    run(main)


def test_keep_alive_serves_100_requests_over_one_connection() -> None:
    async def main() -> None:
        app = App()
        async with serving(app) as server:
            client = HttpClient("127.0.0.1", server.port, max_connections=1)
            for i in range(100):
                status, _, body = await client.request("POST", f"/echo?i={i}", {}, str(i).encode())
                assert (status, body) == (200, str(i).encode())
            assert len(client._all) == 1
            await client.close()
        assert len(app.peers) == 100
        assert len(set(app.peers)) == 1  # every request came from the same client port

    run(main)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        async with serving() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # The first request is the slow one: its answer must still come first.
            writer.write(
                b"GET /sleep?s=0.05&tag=first HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /query?tag=second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            )
            first = await read_response(reader)
            second = await read_response(reader)
            writer.close()
        assert first[0] == second[0] == 200
        assert first[1]["x-tag"] == "first"
        assert second[1]["x-tag"] == "second"
        assert orjson.loads(second[2])["body"] == "hello"

    run(main)


def test_too_large_content_length_gets_413_from_the_hook() -> None:
    def fspiop_too_large(status: int) -> Response:
        error = {"errorInformation": {"errorCode": "3104", "errorDescription": "Payload too large"}}
        return Response(
            status, orjson.dumps(error), content_type="application/vnd.interoperability.error+json"
        )

    async def main() -> None:
        async with serving(max_body_bytes=1024, too_large_response=fspiop_too_large) as server:
            status, headers, body, closed = await raw_exchange(
                server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048
            )
        assert status == 413
        assert orjson.loads(body)["errorInformation"]["errorCode"] == "3104"
        assert headers["connection"] == "close"
        assert closed

    run(main)


def test_too_large_chunked_body_gets_413() -> None:
    async def main() -> None:
        async with serving(max_body_bytes=1024) as server:
            chunks = b"".join(b"200\r\n" + b"y" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
            status, _, body, closed = await raw_exchange(
                server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
            )
        assert status == 413
        assert orjson.loads(body)["error"]["status"] == 413
        assert closed

    run(main)


def test_chunked_request_body_is_assembled() -> None:
    async def main() -> None:
        async with serving() as server:
            status, _, body, _ = await raw_exchange(
                server.port,
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            )
        assert (status, body) == (200, b"hello world")

    run(main)


def test_huge_header_gets_431() -> None:
    async def main() -> None:
        async with serving(max_header_bytes=8192) as server:
            status, _, body, closed = await raw_exchange(
                server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 100_000 + b"\r\n\r\n"
            )
        assert status == 431
        assert orjson.loads(body)["error"]["status"] == 431
        assert closed

    run(main)


def test_malformed_request_gets_400_and_close() -> None:
    async def main() -> None:
        async with serving() as server:
            status, _, _, closed = await raw_exchange(server.port, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        assert status == 400
        assert closed

    run(main)


def test_http_10_and_connection_close_are_honoured() -> None:
    async def main() -> None:
        async with serving() as server:
            status, headers, _, closed = await raw_exchange(server.port, b"GET /q HTTP/1.0\r\n\r\n")
            assert (status, headers["connection"], closed) == (200, "close", True)
            status, headers, _, closed = await raw_exchange(
                server.port, b"GET /q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert (status, headers["connection"], closed) == (200, "close", True)

    run(main)


def test_handler_exception_gives_500_and_server_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving() as server:
            client = HttpClient("127.0.0.1", server.port, max_connections=1)
            status, headers, body = await client.request("GET", "/boom", {})
            assert status == 500
            assert headers["content-type"] == "application/json"
            assert b"exploded" not in body  # no internals leak to the client
            status, _, _ = await client.request("GET", "/after", {})
            assert status == 200
            assert len(client._all) == 1  # the same connection survived the 500
            await client.close()

    with caplog.at_level(logging.ERROR, logger="api.http"):
        run(main)
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None  # logged with its traceback


def test_slow_handler_gets_503_after_request_timeout() -> None:
    async def main() -> None:
        async with serving(request_timeout_s=0.2) as server:
            client = HttpClient("127.0.0.1", server.port, request_timeout_s=5.0)
            status, _, _ = await client.request("GET", "/sleep?s=10", {})
            assert status == 503
            status, _, _ = await client.request("GET", "/after", {})
            assert status == 200
            await client.close()

    run(main)


def test_client_timeout_against_a_sleeping_handler() -> None:
    async def main() -> None:
        async with serving() as server:
            client = HttpClient("127.0.0.1", server.port, request_timeout_s=0.2)
            with pytest.raises(asyncio.TimeoutError) as caught:
                await client.request("GET", "/sleep?s=2", {})
            assert isinstance(caught.value, HttpTimeout)
            assert not client._all and not client._idle  # the timed-out connection was discarded
            status, _, _ = await client.request("GET", "/after", {})  # a fresh connection works
            assert status == 200
            await client.close()

    run(main)


def test_client_against_a_closed_port_raises_connection_error() -> None:
    async def main() -> None:
        with socket.socket() as probe:  # a port that was just free: nothing listens there
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        client = HttpClient("127.0.0.1", port)
        with pytest.raises(ConnectionError):
            await client.request("GET", "/", {})
        await client.close()

    run(main)


def test_client_retries_once_when_the_server_dropped_an_idle_connection() -> None:
    async def main() -> None:
        async with serving(keepalive_timeout_s=0.05) as server:
            client = HttpClient("127.0.0.1", server.port)
            assert (await client.request("GET", "/a", {}))[0] == 200
            await asyncio.sleep(0.4)  # the server closes the idle connection meanwhile
            assert (await client.request("GET", "/b", {}))[0] == 200
            await client.close()

    run(main)


def test_200_concurrent_requests_through_client_pool_with_4_connections() -> None:
    async def main() -> None:
        app = App()
        async with serving(app) as server:
            pool = ClientPool(max_connections=4)
            url = f"http://127.0.0.1:{server.port}"
            results = await asyncio.gather(
                *(
                    pool.request("PUT", f"{url}/yield?n={i}", {"FSPIOP-Source": "dfsp1"}, b"{}")
                    for i in range(200)
                )
            )
            await pool.close()
        assert [status for status, _, _ in results] == [200] * 200
        assert [orjson.loads(body)["query"]["n"] for _, _, body in results] == [str(i) for i in range(200)]
        assert len(set(app.peers)) <= 4  # never more than 4 connections
        assert app.max_active <= 4

    run(main)


def test_utf8_body_round_trips_byte_exact() -> None:
    async def main() -> None:
        text = "မြန်မာ Zoë"
        body = orjson.dumps({"note": text, "raw": text})
        async with serving() as server:
            client = HttpClient("127.0.0.1", server.port)
            status, _, echoed = await client.request(
                "POST", "/echo", {"Content-Type": "application/json"}, body
            )
            status2, _, seen = await client.request("GET", f"/{text}?name={text}", {})
            await client.close()
        assert status == 200 and echoed == body
        assert orjson.loads(echoed)["note"] == text
        assert status2 == 200
        assert orjson.loads(seen)["path"] == f"/{text}"  # the client percent-encodes, the server decodes
        assert orjson.loads(seen)["query"] == {"name": text}

    run(main)


def test_stop_closes_idle_keep_alive_connections() -> None:
    async def main() -> None:
        server = HttpServer(App())
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        await server.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    run(main)


def test_sync_handler_keep_alive_and_errors_over_one_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        app = SyncApp()
        async with serving(app) as server:
            assert server._handler_is_sync and not HttpServer(App())._handler_is_sync
            client = HttpClient("127.0.0.1", server.port, max_connections=1)
            for i in range(50):
                status, _, body = await client.request("POST", f"/echo?i={i}", {}, str(i).encode())
                assert (status, body) == (200, str(i).encode())
            assert (await client.request("GET", "/boom", {}))[0] == 500
            assert (await client.request("GET", "/not-a-response", {}))[0] == 500
            status, headers, body = await client.request("HEAD", "/head", {})
            assert (status, body, headers["content-length"]) == (200, b"", "5")
            assert (await client.request("GET", "/after", {}))[:3:2] == (200, b"/after")
            assert len(client._all) == 1  # the 500s did not cost the connection
            await client.close()
        assert len(app.paths) == 54

    with caplog.at_level(logging.ERROR, logger="api.http"):
        run(main)
    assert sum("handler failed" in r.getMessage() for r in caplog.records) == 2


def test_sync_handler_answers_pipelined_requests_in_order_and_stops_at_close() -> None:
    async def main() -> None:
        app = SyncApp()
        async with serving(app) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # One write, four requests: the third asks to close, so the fourth is never handled.
            writer.write(
                b"GET /a?tag=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /b?tag=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /c?tag=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                b"GET /d?tag=4 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            answers = [await read_response(reader) for _ in range(3)]
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the third
            writer.close()
        assert [headers["x-tag"] for _, headers, _ in answers] == ["1", "2", "3"]
        assert [body for _, _, body in answers] == [b"/a", b"hello", b"/c"]
        assert answers[2][1]["connection"] == "close"
        assert app.paths == ["/a", "/b", "/c"]

    run(main)


def test_sync_handler_over_http_10_and_after_a_malformed_request() -> None:
    async def main() -> None:
        async with serving(SyncApp()) as server:
            status, headers, body, closed = await raw_exchange(server.port, b"GET /q HTTP/1.0\r\n\r\n")
            assert (status, headers["connection"], body, closed) == (200, "close", b"/q", True)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert (status, headers["connection"], body) == (200, "keep-alive", b"/k")
            # A good request and garbage in one read: the answer to the first, then 400 and close.
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\x00 / HTTP/1.1\r\n\r\n")
            assert (await read_response(reader))[::2] == (200, b"/ok")
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (400, "close")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run(main)
