"""Small-request throughput of api.http: server and clients in one process, on one core.

Not a test; a number to compare across changes. Each of N keep-alive connections sends an
FSPIOP-sized POST and waits for the 202 before sending the next (``--depth`` > 1 keeps that many
pipelined on each connection instead). Two client sides:

* ``raw``    a minimal httptools protocol that replays one pre-encoded request, so almost all of the
             CPU goes to the server: the closest to "server requests/s per core".
* ``client`` api.http.HttpClient, so the number is server + client sharing the core (what a hub
             calling itself would see; roughly half the raw figure).

    python loadtests/http_micro.py --mode both --connections 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import httptools
import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from api.http import HttpClient, HttpServer, Request, Response  # noqa: E402

BODY = (
    b'{"transferId":"b51ec534-ee48-4575-b6a9-ead2955b8069","payerFsp":"dfsp1","payeeFsp":"dfsp2",'
    b'"amount":{"amount":"123.45","currency":"USD"},"expiration":"2026-01-01T00:00:00.000Z",'
    b'"ilpPacket":"AYIBgQAAAAAAAASwNGxldmVsb25lLmRmc3AxLm1lci45T2RTOF83MDdPMmpYaEp","condition":'
    b'"f5sqb7tBTWPd5Y8BDFdMm9BJR_MNI4isf8p8n4D5pHA"}'
)
HEADERS = [
    ("Content-Type", "application/vnd.interoperability.transfers+json;version=1.1"),
    ("Accept", "application/vnd.interoperability.transfers+json;version=1"),
    ("Date", "Thu, 01 Jan 2026 00:00:00 GMT"),
    ("FSPIOP-Source", "dfsp1"),
    ("FSPIOP-Destination", "dfsp2"),
]


async def handler(request: Request) -> Response:
    # What the FSPIOP layer does for a valid POST: accept now, answer by callback later.
    return Response(202)


class _RawConnection(asyncio.Protocol):
    """Replays one pre-encoded request; keeps ``depth`` in flight; counts completed responses."""

    def __init__(self, request: bytes, depth: int, counter: list[int], stop: asyncio.Event):
        self.request = request
        self.depth = depth
        self.counter = counter
        self.stop = stop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outstanding = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.outstanding = self.depth
        self.transport.write(self.request * self.depth)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.counter[0] += 1
        self.outstanding -= 1
        if not self.stop.is_set():
            self.outstanding += 1
            self.transport.write(self.request)  # type: ignore[union-attr]
        elif self.outstanding == 0 and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_raw(
    port: int, connections: int, depth: int, seconds: float, warmup: float
) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    head = f"POST /transfers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(BODY)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in HEADERS) + "\r\n"
    request = head.encode() + BODY
    counter = [0]
    stop = asyncio.Event()
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _RawConnection(request, depth, counter, stop), "127.0.0.1", port
        )
        protocols.append(protocol)
    await asyncio.sleep(warmup)
    start_count, started = counter[0], time.perf_counter()
    await asyncio.sleep(seconds)
    count, elapsed = counter[0] - start_count, time.perf_counter() - started
    stop.set()
    await asyncio.gather(*(p.done for p in protocols))
    for protocol in protocols:
        protocol.transport.close()
    return count, elapsed


async def run_client(port: int, connections: int, seconds: float, warmup: float) -> tuple[int, float]:
    client = HttpClient("127.0.0.1", port, max_connections=connections)
    counter = [0]
    stopping = False

    async def worker() -> None:
        while not stopping:
            status, _, _ = await client.request("POST", "/transfers", HEADERS, BODY)
            if status != 202:
                raise RuntimeError(f"unexpected status {status}")
            counter[0] += 1

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(warmup)
    start_count, started = counter[0], time.perf_counter()
    await asyncio.sleep(seconds)
    count, elapsed = counter[0] - start_count, time.perf_counter() - started
    stopping = True
    await asyncio.gather(*workers)
    await client.close()
    return count, elapsed


async def main(args: argparse.Namespace) -> None:
    server = HttpServer(handler, "127.0.0.1", 0)
    port = await server.start()
    modes = ["raw", "client"] if args.mode == "both" else [args.mode]
    try:
        for mode in modes:
            for _ in range(args.runs):
                if mode == "raw":
                    count, elapsed = await run_raw(
                        port, args.connections, args.depth, args.seconds, args.warmup
                    )
                    label = f"raw    connections={args.connections} depth={args.depth}"
                else:
                    count, elapsed = await run_client(port, args.connections, args.seconds, args.warmup)
                    label = f"client connections={args.connections}"
                print(f"{label}: {count / elapsed:,.0f} requests/s ({count} in {elapsed:.2f} s)", flush=True)
    finally:
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["raw", "client", "both"], default="both")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--depth", type=int, default=1, help="pipelined requests per connection (raw mode)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    uvloop.run(main(parser.parse_args()))
