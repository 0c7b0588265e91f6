"""The lean asyncio payer driver shared by ``loadtests/bench.py`` and ``tests/test_load_smoke.py``.

The payers are one ``sim.simulator.Simulator`` in this process: it builds each prepare (ILP packet and a
condition from the payee's secret, which the payee simulator process was given) and receives the
payers' callbacks. A transfer counts when its payer hears ``PUT /transfers/{ID}`` COMMITTED; its latency
is from sending the prepare to that callback. Anything else is an error, counted by kind: a prepare not
answered 202, an error callback or another final state, no callback within the timeout, a connection
failure.

Two ways to drive: closed loop (``users`` virtual payers, each waiting for its callback before the next
prepare: finds the maximum throughput) or open loop (``rate_per_s`` prepares a second whatever the
answers, at most ``in_flight_max`` outstanding: the seed deck's "400 transfers/s for an hour").
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from api.http import HttpConnectionError, HttpTimeout
from sim.simulator import Received, Simulator


@dataclass
class RunResult:
    seconds: float
    latencies_ms: list[float]  # committed transfers, in completion order
    per_second: list[list[float]]  # latencies of the transfers completed in each second since the start
    committed_by_pair: dict[tuple[str, str], int]  # (payer, payee) -> transfers committed
    refused: int = 0  # the prepare was not answered 202
    error_callbacks: int = 0  # PUT /transfers/{ID}/error, or a final state other than COMMITTED
    timeouts: int = 0  # no callback within callback_timeout_s (outcome unknown)
    connection_errors: int = 0  # the prepare could not be sent or its answer was lost
    not_sent: int = 0  # open loop only: due while in_flight_max were outstanding

    @property
    def transfers(self) -> int:
        return len(self.latencies_ms)

    @property
    def errors(self) -> int:
        return self.refused + self.error_callbacks + self.timeouts + self.connection_errors

    def summary(self) -> dict:
        ordered = sorted(self.latencies_ms)
        return {
            "transfers": self.transfers,
            "seconds": round(self.seconds, 2),
            "transfers_per_s": round(self.transfers / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": percentile(ordered, 0.50), "p95_ms": percentile(ordered, 0.95),
            "p99_ms": percentile(ordered, 0.99), "max_ms": round(ordered[-1], 1) if ordered else 0.0,
            "share_over_1s": round(sum(1 for x in ordered if x > 1000) / max(1, len(ordered)), 5),
            "errors": self.errors,
            "errors_by_kind": {"refused": self.refused, "error_callbacks": self.error_callbacks,
                               "timeouts": self.timeouts, "connection": self.connection_errors},
            "not_sent": self.not_sent,
            "per_second": [
                {"t": second, "transfers": len(values), "p50_ms": percentile(sorted(values), 0.50),
                 "p99_ms": percentile(sorted(values), 0.99)}
                for second, values in enumerate(self.per_second)
            ],
        }


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for none)."""
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * share))], 1)


@dataclass
class PayerDriver:
    """Payers against one FSPIOP base URL (a hub or the null forwarder); see the module docstring."""

    target_url: str
    payee_secrets: dict[str, bytes]
    pairs: list[tuple[str, str]]  # (payer, payee)
    currency: str = "XTS"
    amount: str = "1"
    connections_max: int = 256
    callback_timeout_s: float = 30.0
    simulator: Simulator = field(init=False)
    _waiting: dict[str, asyncio.Future] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.simulator = Simulator(self.target_url, record=False, max_connections=self.connections_max,
                                   request_timeout_s=self.callback_timeout_s)
        for payer in dict.fromkeys(payer for payer, _ in self.pairs):
            self.simulator.add_dfsp(payer)
        for payee, secret in self.payee_secrets.items():
            # Only to build conditions: the hub sends this payee's prepares to the payee process.
            self.simulator.add_dfsp(payee, secret=secret)
        self.simulator.on_request = self._on_request

    async def start(self) -> int:
        return await self.simulator.start()

    async def stop(self) -> None:
        await self.simulator.stop()

    def endpoints(self, payer: str) -> dict[str, str]:
        return self.simulator.endpoints(payer)

    def _on_request(self, received: Received) -> None:
        if received.method != "PUT" or not received.path.startswith("/transfers/"):
            return
        future = self._waiting.pop(received.path.split("/")[2], None)
        if future is not None and not future.done():
            committed = not received.path.endswith("/error") and received.body.get("transferState") == "COMMITTED"
            future.set_result(committed)

    async def run(self, duration_s: float, *, users: int | None = None, rate_per_s: float | None = None,
                  in_flight_max: int = 2_000) -> RunResult:
        """Drive for ``duration_s``: closed loop with ``users``, or open loop at ``rate_per_s``."""
        if (users is None) == (rate_per_s is None):
            raise ValueError("give exactly one of users (closed loop) or rate_per_s (open loop)")
        started = time.perf_counter()
        result = RunResult(0.0, [], [], dict.fromkeys(self.pairs, 0))
        if users is not None:
            deadline = started + duration_s

            async def user(index: int) -> None:
                pair = self.pairs[index % len(self.pairs)]
                while time.perf_counter() < deadline:
                    await self._transfer(pair, started, result)

            await asyncio.gather(*(user(i) for i in range(users)))
        else:
            await self._open_loop(duration_s, rate_per_s, in_flight_max, started, result)
        result.seconds = time.perf_counter() - started
        return result

    async def _open_loop(self, duration_s: float, rate_per_s: float, in_flight_max: int, started: float,
                         result: RunResult) -> None:
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        sent = 0
        tick_s = 0.005
        while (elapsed := time.perf_counter() - started) < duration_s:
            for _ in range(int(elapsed * rate_per_s) - sent):
                sent += 1
                if len(tasks) >= in_flight_max:
                    result.not_sent += 1
                    continue
                task = loop.create_task(self._transfer(self.pairs[sent % len(self.pairs)], started, result))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(tick_s)
        if tasks:
            await asyncio.gather(*tasks)

    async def _transfer(self, pair: tuple[str, str], started: float, result: RunResult) -> None:
        payer, payee = pair
        body = self.simulator.prepare_body(payer, payee, self.amount, self.currency)
        future = asyncio.get_running_loop().create_future()
        self._waiting[body["transferId"]] = future
        sent = time.perf_counter()
        try:
            status, _ = await self.simulator.send("POST", "/transfers", body, source=payer, destination=payee)
        except (HttpConnectionError, HttpTimeout, OSError):
            self._waiting.pop(body["transferId"], None)
            result.connection_errors += 1
            return
        if status != 202:
            self._waiting.pop(body["transferId"], None)
            result.refused += 1
            return
        try:
            committed = await asyncio.wait_for(future, self.callback_timeout_s)
        except TimeoutError:
            self._waiting.pop(body["transferId"], None)
            result.timeouts += 1
            return
        if not committed:
            result.error_callbacks += 1
            return
        now = time.perf_counter()
        latency_ms = (now - sent) * 1000
        result.latencies_ms.append(latency_ms)
        second = int(now - started)
        while len(result.per_second) <= second:
            result.per_second.append([])
        result.per_second[second].append(latency_ms)
        result.committed_by_pair[pair] += 1
