"""Callback delivery in a process of its own, beside the ingress worker.

Sending a callback costs the ingress worker's event loop more than anything else it does for a
transfer but the write-behind flush: the request's ``send()`` (on loopback it also runs the
receiver's TCP path), reading and parsing the DFSP's answer, timers, retries. The worker's loop is
the hub's bottleneck on a small machine (docs/BENCHMARKS.md), while the cores have time to spare.

With ``RAYLOOP_CALLBACK_PROCESS=on`` the worker hands each callback, already built and after the
change it reports is durable, to a sender process over a socketpair: one ``write`` per event-loop
tick carries every callback queued in that tick. The sender runs the ordinary ``CallbackDispatcher``
(a queue and workers per DFSP, timeouts, retries, backoff; a slow or dead DFSP stalls only its own
queue) and sends each final outcome back, so the worker keeps the callback metrics and the transfer
flow metrics exactly as before.

Wire format, both ways on one stream socket:

* worker to sender, per callback: ``[id, fsp, method, url, headers, kind, body_length]`` as one JSON
  line, then the body's bytes;
* sender to worker, per batch: a JSON line ``[[id, outcome], ...]``.

If the sender dies, every callback it held is counted as dropped (as a worker's own crash would
drop its queue) and the next callback starts a new one. When the worker's end of the socket closes
(the worker stopped, after draining, or died), the sender drops what it still holds and exits.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import subprocess
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable

import orjson

from api.fspiop.callbacks import (
    CallbackDispatcher,
    CallbackMetrics,
    HeaderList,
    Outcome,
    _tell,
    delivery_options,
    wait_until_set,
)

log = logging.getLogger(__name__)

_OUTCOMES = tuple(Outcome)
_OUTCOME_CODE = {outcome: code for code, outcome in enumerate(_OUTCOMES)}


class _Link(asyncio.Protocol):
    """The worker's end of the socket: reads outcome lines."""

    def __init__(self, owner: CallbackSenderProcess):
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer:
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.owner._outcomes(orjson.loads(line))

    def connection_lost(self, exc) -> None:
        self.owner._lost(self)


class CallbackSenderProcess:
    """A ``CallbackDispatcher`` look-alike for the ingress worker whose deliveries run in a child process.

    Same ``send``/``pending``/``drain``/``close``/``queue_depth`` as ``CallbackDispatcher``; the
    metrics are recorded here, when the outcome comes back. ``queue_depth`` counts the callbacks
    handed to the sender and not finished (queued there or in flight).
    """

    def __init__(self, *, metrics: CallbackMetrics | None = None, **options: int):
        """``options``: those of ``CallbackDispatcher`` (queue_max_per_fsp, timeout_ms, retries, ...)."""
        self._options = delivery_options(**options)
        self._queue_max = self._options["queue_max_per_fsp"]
        self.metrics = metrics or CallbackMetrics()
        self._next_id = 0
        # id -> (fsp, kind, queued_at, on_outcome)
        self._waiting: dict[int, tuple[str, str, float, Callable[[Outcome], None] | None]] = {}
        self._per_fsp: Tally[str] = Tally()
        self._depth_readers: dict[str, Callable[[], int]] = {}  # fsp -> what the depth gauge reads when scraped
        self._out: list[bytes] = []
        self._write_scheduled = False
        self._link: _Link | None = None
        self._starting: asyncio.Task | None = None
        self._process: subprocess.Popen | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.restarts = 0

    # ---- the dispatcher interface

    def send(
        self, fsp: str, method: str, url: str, headers: HeaderList, body: bytes, *, kind: str,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> bool:
        self.metrics.start_kind(kind)
        if self._closed or self._per_fsp[fsp] >= self._queue_max:
            self.metrics.refused(kind)
            _tell(on_outcome, Outcome.DROPPED)
            return False
        if self._link is None:
            self._start_soon()
        job_id = self._next_id = self._next_id + 1
        if isinstance(headers, dict):
            headers = list(headers.items())
        self._out.append(orjson.dumps((job_id, fsp, method, url, headers, kind, len(body))) + b"\n")
        self._out.append(body)
        self._waiting[job_id] = (fsp, kind, time.perf_counter(), on_outcome)
        self._per_fsp[fsp] += 1
        if fsp not in self._depth_readers:
            self._depth_readers[fsp] = reader = functools.partial(self._per_fsp.__getitem__, fsp)
            self.metrics.watch_depth(fsp, reader)
        self._idle.clear()
        if not self._write_scheduled and self._link is not None:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)
        return True

    def queue_depth(self, fsp: str) -> int:
        return self._per_fsp[fsp]

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def drain(self, timeout_s: float) -> bool:
        return await wait_until_set(self._idle, timeout_s)

    async def close(self) -> None:
        """Stop at once: what the sender still holds is dropped (call ``drain`` first to wait for it)."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()
        self._drop_all()
        for fsp, reader in self._depth_readers.items():
            self.metrics.unwatch_depth(fsp, reader)
        process, self._process = self._process, None
        if process is not None:
            await asyncio.get_running_loop().run_in_executor(None, _reap, process)

    # ---- internals

    async def start(self) -> None:
        """Start the sender process (``send`` also starts one when there is none)."""
        if self._link is None:
            await self._connect()

    def _start_soon(self) -> None:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.get_running_loop().create_task(self._connect())
            self._starting.add_done_callback(self._started)

    def _started(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # No sender (fork failed, out of memory...): what was queued for it can never go, so it is
        # dropped now rather than left pending; the next callback tries to start one again.
        log.error("callback sender process could not start: %r; %d callbacks dropped",
                  task.exception(), len(self._waiting))
        self._drop_all()

    async def _connect(self) -> None:
        if self._process is not None:
            self._process.poll()  # reap the one that died, so no zombie is left behind
        parent, child = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "api.fspiop.callback_sender", str(child.fileno()), json.dumps(self._options)],
                pass_fds=(child.fileno(),),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        link = _Link(self)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: link, parent)
        if self._closed:
            link.transport.close()
            return
        self._link = link
        self._write()  # what was queued while it started

    def _write(self) -> None:
        self._write_scheduled = False
        link = self._link
        if not self._out or link is None or link.transport is None:
            return  # nothing to send, or kept until the sender is up
        data, self._out = b"".join(self._out), []
        link.transport.write(data)

    def _outcomes(self, pairs: list) -> None:
        now = time.perf_counter()
        for job_id, code in pairs:
            entry = self._waiting.pop(job_id, None)
            if entry is not None:
                self._finish(entry, _OUTCOMES[code], now)
        if not self._waiting:
            self._idle.set()

    def _finish(self, entry, outcome: Outcome, now: float) -> None:
        fsp, kind, queued_at, on_outcome = entry
        self.metrics.finished(kind, outcome, now - queued_at)
        self._per_fsp[fsp] -= 1
        if on_outcome is not None:
            _tell(on_outcome, outcome)

    def _lost(self, link: _Link) -> None:
        if link is not self._link:
            return
        self._link = None
        if not self._closed:
            self.restarts += 1
            log.error("callback sender process ended; %d callbacks it held are dropped", len(self._waiting))
        self._drop_all()

    def _drop_all(self) -> None:
        now = time.perf_counter()
        waiting, self._waiting = self._waiting, {}
        self._out.clear()
        for entry in waiting.values():
            self._finish(entry, Outcome.DROPPED, now)
        self._idle.set()


def _reap(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------- the sender process


class _Sender(asyncio.Protocol):
    def __init__(self, dispatcher: CallbackDispatcher, done: asyncio.Future):
        self.dispatcher = dispatcher
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.outcomes: list[tuple[int, int]] = []
        self.write_scheduled = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            job_id, fsp, method, url, headers, kind, length = orjson.loads(buffer[start:newline])
            end = newline + 1 + length
            if end > len(buffer):
                break
            body = bytes(buffer[newline + 1:end])
            start = end
            self.dispatcher.send(fsp, method, url, [tuple(h) for h in headers], body, kind=kind,
                                 on_outcome=lambda outcome, job_id=job_id: self._report(job_id, outcome))
        del buffer[:start]

    def _report(self, job_id: int, outcome: Outcome) -> None:
        self.outcomes.append((job_id, _OUTCOME_CODE[outcome]))
        if not self.write_scheduled:
            self.write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self.write_scheduled = False
        if self.outcomes and self.transport is not None and not self.transport.is_closing():
            self.transport.write(orjson.dumps(self.outcomes) + b"\n")
        self.outcomes = []

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _serve(fd: int, options: dict) -> None:
    from prometheus_client import CollectorRegistry

    loop = asyncio.get_running_loop()
    # Metrics are kept by the worker, from the outcomes; these only satisfy the dispatcher.
    dispatcher = CallbackDispatcher(metrics=CallbackMetrics(CollectorRegistry()), **options)
    done = loop.create_future()
    sock = socket.socket(fileno=fd)
    await loop.connect_accepted_socket(lambda: _Sender(dispatcher, done), sock)
    await done
    # The worker closed its end: it counts what this process still holds as dropped (it drains
    # before closing when it stops gracefully), so nothing more may be sent.
    await dispatcher.close()


def main() -> None:
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s callback-sender %(levelname)s %(message)s")
    fd, options = int(sys.argv[1]), json.loads(sys.argv[2])
    uvloop.run(_serve(fd, options))


if __name__ == "__main__":
    main()
