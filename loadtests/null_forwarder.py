"""A "hub" that only forwards: the ceiling rayloop's transfer throughput is measured against.

Same HTTP stack as the hub's ingress (``api/http.py``: ``HttpServer`` in, the pooled client out), same
headers forwarded (``api.fspiop.callbacks.forward_headers``), same answer-then-forward order, but nothing
else: no header or schema validation, no participant checks, no ledger, no Postgres.

- ``POST /transfers``: 202, then the request, unchanged, to FSPIOP-Destination's
  ``FSPIOP_CALLBACK_URL_TRANSFER_POST``.
- ``PUT /transfers/{ID}`` and ``PUT /transfers/{ID}/error``: 200, then unchanged to FSPIOP-Destination's
  ``..._TRANSFER_PUT`` / ``..._TRANSFER_ERROR`` (``{{transferId}}`` filled in).

Runs ``--workers`` processes sharing one port (``SO_REUSEPORT``), as the hub's ingress workers do:

    python -m loadtests.null_forwarder --workers 1 --endpoints endpoints.json

``endpoints.json``: ``{"dfsp": {"FSPIOP_CALLBACK_URL_TRANSFER_POST": "http://...", ...}, ...}``.
Prints ``{"port": N}`` once every worker listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import uvloop

from api.fspiop.callbacks import forward_headers
from api.http import ClientPool, HttpConnectionError, HttpServer, HttpTimeout, Request, Response

REPO_ROOT = Path(__file__).resolve().parent.parent
_NOT_FOUND = Response(404, b'{"errorInformation":{"errorCode":"3002","errorDescription":"Unknown URI"}}',
                      content_type="application/json")


class NullForwarder:
    """One worker: answers at once, forwards in a background task (bounded by ``tasks_max``)."""

    def __init__(self, endpoints: dict[str, dict[str, str]], *, connections_max: int, timeout_ms: int,
                 tasks_max: int):
        self.endpoints = endpoints
        self.client = ClientPool(max_connections=connections_max, request_timeout_s=timeout_ms / 1000)
        self.tasks_max = tasks_max
        # As the hub's ingress keeps its own (api/fspiop/ingress.py): by number, dropped by the task itself.
        self.tasks: dict[int, asyncio.Task] = {}
        self._task_numbers = itertools.count()
        self.forwarded = 0
        self.failed = 0
        self.dropped = 0  # over tasks_max: refused with 503, as the hub refuses over its queue bounds

    def handle(self, request: Request) -> Response:
        """Synchronous, like the hub's ingress: the server answers from its parser (api/http.py)."""
        parts = request.path.strip("/").split("/")
        if parts[0] != "transfers":
            return _NOT_FOUND
        if request.method == "POST" and len(parts) == 1:
            endpoint_type, transfer_id, status = "FSPIOP_CALLBACK_URL_TRANSFER_POST", None, 202
        elif request.method == "PUT" and len(parts) == 2:
            endpoint_type, transfer_id, status = "FSPIOP_CALLBACK_URL_TRANSFER_PUT", parts[1], 200
        elif request.method == "PUT" and len(parts) == 3 and parts[2] == "error":
            endpoint_type, transfer_id, status = "FSPIOP_CALLBACK_URL_TRANSFER_ERROR", parts[1], 200
        else:
            return _NOT_FOUND
        template = self.endpoints.get(request.headers.get("fspiop-destination", ""), {}).get(endpoint_type)
        if template is None:
            return _NOT_FOUND
        if len(self.tasks) >= self.tasks_max:
            self.dropped += 1
            return Response(503)
        url = template if transfer_id is None else template.replace("{{transferId}}", transfer_id)
        headers = forward_headers(request.headers, method=request.method)
        number = next(self._task_numbers)
        self.tasks[number] = asyncio.get_running_loop().create_task(
            self._forward(number, request.method, url, headers, request.body)
        )
        return Response(status)

    async def _forward(self, number: int, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            status, _, _ = await self.client.request(method, url, headers, body)
        except (HttpConnectionError, HttpTimeout, OSError):
            self.failed += 1
            return
        finally:
            self.tasks.pop(number, None)
        if 200 <= status < 300:
            self.forwarded += 1
        else:
            self.failed += 1


async def _worker(args: argparse.Namespace) -> None:
    endpoints = orjson.loads(Path(args.endpoints).read_bytes())
    forwarder = NullForwarder(endpoints, connections_max=args.connections_max, timeout_ms=args.timeout_ms,
                              tasks_max=args.tasks_max)
    server = HttpServer(forwarder.handle, args.host, args.port, reuse_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        await forwarder.client.close()
        print(json.dumps({"forwarded": forwarder.forwarded, "failed": forwarder.failed,
                          "dropped": forwarder.dropped}), flush=True)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ForwarderProcesses:
    """``workers`` forwarder processes on one port, started from Python (the benchmark uses this)."""

    def __init__(self, endpoints_file: Path, *, workers: int = 1, host: str = "127.0.0.1", port: int = 0,
                 connections_max: int = 256, timeout_ms: int = 5_000, tasks_max: int = 20_000):
        self.port = port or free_port(host)
        command = [sys.executable, "-m", "loadtests.null_forwarder", "--worker", "--host", host,
                   "--port", str(self.port), "--endpoints", str(endpoints_file),
                   "--connections-max", str(connections_max), "--timeout-ms", str(timeout_ms),
                   "--tasks-max", str(tasks_max)]
        self.processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
                          for _ in range(workers)]
        for process in self.processes:
            line = process.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError("a null forwarder worker did not start")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Stop every worker; returns their summed counters."""
        totals = {"forwarded": 0, "failed": 0, "dropped": 0}
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                out, _ = process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                continue
            for line in out.splitlines():
                if line.startswith('{"forwarded"'):
                    for key, value in json.loads(line).items():
                        totals[key] += value
        return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.null_forwarder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", required=True, type=Path, help="JSON: DFSP -> endpoint type -> URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (like the ingress)")
    parser.add_argument("--connections-max", type=int, default=256, help="outbound connections per destination")
    parser.add_argument("--timeout-ms", type=int, default=5_000, help="one forwarded request")
    parser.add_argument("--tasks-max", type=int, default=20_000, help="forwards in flight per worker; then 503")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        uvloop.run(_worker(args))
        return 0
    processes = ForwarderProcesses(args.endpoints, workers=args.workers, host=args.host, port=args.port,
                                   connections_max=args.connections_max, timeout_ms=args.timeout_ms,
                                   tasks_max=args.tasks_max)
    print(json.dumps({"port": processes.port}), flush=True)
    stopped = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.append(True))
    while not stopped and all(process.poll() is None for process in processes.processes):
        time.sleep(0.5)
    print(json.dumps(processes.stop()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
