"""api.fspiop.callback_sender: callbacks delivered by a real child process over real sockets."""

from __future__ import annotations

import asyncio
import os
import signal

from prometheus_client import CollectorRegistry

from api.fspiop.callback_sender import CallbackSenderProcess
from api.fspiop.callbacks import CallbackMetrics, Outcome
from tests.test_callbacks import PUT_HEADERS, Dfsp, closed_port, run, sample, serving


def _sender(**options) -> CallbackSenderProcess:
    options.setdefault("metrics", CallbackMetrics(CollectorRegistry()))
    return CallbackSenderProcess(**options)


def test_delivers_through_the_child_and_records_outcomes_here():
    async def main():
        dfsp = Dfsp(statuses=[404])  # the first request is refused, the rest are taken
        dfsp.expect = 51
        sender = _sender(timeout_ms=1_000, retries=0)
        await sender.start()
        outcomes: list[Outcome] = []
        try:
            async with serving(dfsp) as base:
                for index in range(50):
                    body = b'{"transferState":"COMMITTED","n":%d}' % index
                    assert sender.send("payerfsp", "put", f"{base}/transfers/{index}", PUT_HEADERS, body,
                                       kind="transfer_put", on_outcome=outcomes.append)
                assert sender.send("deadfsp", "PUT", f"http://127.0.0.1:{closed_port()}/x", {"FSPIOP-Source": "Hub"},
                                   b"{}", kind="transfer_error", on_outcome=outcomes.append)
                assert sender.pending == 51
                assert await sender.drain(10.0)
        finally:
            await sender.close()
        assert outcomes.count(Outcome.DELIVERED) == 49
        assert outcomes.count(Outcome.REJECTED) == 1 and outcomes.count(Outcome.FAILED) == 1
        assert sender.pending == 0 and sender.queue_depth("payerfsp") == 0
        assert len(dfsp.requests) == 50
        # Method, headers and body arrive as the worker built them.
        request = next(r for r in dfsp.requests if r.path == "/transfers/7")
        assert request.method == "PUT" and request.body == b'{"transferState":"COMMITTED","n":7}'
        assert request.headers["fspiop-source"] == "payeefsp"
        assert "accept" not in request.headers
        # The metrics are the worker's, recorded from the outcomes the child sent back.
        assert sample(sender, "rayloop_callbacks_total", kind="transfer_put", outcome="delivered") == 49
        assert sample(sender, "rayloop_callbacks_total", kind="transfer_put", outcome="rejected") == 1
        assert sample(sender, "rayloop_callbacks_total", kind="transfer_error", outcome="failed") == 1
        assert sample(sender, "rayloop_callback_seconds_count", kind="transfer_put", outcome="delivered") == 49

    run(main)


def test_a_dead_sender_drops_what_it_held_and_the_next_callback_starts_another():
    async def main():
        dfsp = Dfsp(delay_s=5.0)  # slow: the callbacks are still in the child when it dies
        dfsp.expect = 3
        sender = _sender(timeout_ms=10_000, retries=0)
        await sender.start()
        outcomes: list[Outcome] = []
        try:
            async with serving(dfsp) as base:
                for index in range(3):
                    sender.send("slowfsp", "PUT", f"{base}/transfers/{index}", PUT_HEADERS, b"{}", kind="transfer_put",
                                on_outcome=outcomes.append)
                await asyncio.wait_for(dfsp.arrived.wait(), 5.0)
                first = sender._process
                os.kill(first.pid, signal.SIGKILL)
                async with asyncio.timeout(5.0):
                    while len(outcomes) < 3:
                        await asyncio.sleep(0.01)
                assert outcomes == [Outcome.DROPPED] * 3 and sender.pending == 0
                assert sender.restarts == 1
                assert sample(sender, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped") == 3

                dfsp.delay_s = 0.0
                assert sender.send("slowfsp", "PUT", f"{base}/transfers/again", PUT_HEADERS, b"{}",
                                   kind="transfer_put", on_outcome=outcomes.append)
                assert await sender.drain(5.0)
                assert outcomes[-1] is Outcome.DELIVERED
                assert sender._process is not first and sender._process.poll() is None
        finally:
            await sender.close()

    run(main)


def test_full_queue_and_closed_sender_drop_without_sending():
    async def main():
        dfsp = Dfsp(delay_s=1.0)
        sender = _sender(queue_max_per_fsp=2, timeout_ms=5_000, retries=0)
        await sender.start()
        outcomes: list[Outcome] = []
        async with serving(dfsp) as base:
            sent = [sender.send("fsp", "PUT", f"{base}/t/{n}", PUT_HEADERS, b"{}", kind="transfer_put",
                                on_outcome=outcomes.append) for n in range(3)]
            assert sent == [True, True, False] and outcomes == [Outcome.DROPPED]
            process = sender._process
            await sender.close()  # cuts off what the child still holds
            assert outcomes == [Outcome.DROPPED] * 3
            assert process.poll() is not None  # the child saw its socket close, and exited
            assert not sender.send("fsp", "PUT", f"{base}/t/late", PUT_HEADERS, b"{}", kind="transfer_put")
        assert sample(sender, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped") == 4

    run(main)


def test_the_setting_is_off_unless_asked_for(monkeypatch):
    from cluster.config import HubConfig

    monkeypatch.delenv("RAYLOOP_CALLBACK_PROCESS", raising=False)
    assert HubConfig.from_env().callback_process is False
    monkeypatch.setenv("RAYLOOP_CALLBACK_PROCESS", "on")
    assert HubConfig.from_env().callback_process is True


def test_every_switch_reads_the_same_spellings(monkeypatch):
    from cluster.config import HubConfig

    switches = {"RAYLOOP_CALLBACK_PROCESS": "callback_process", "RAYLOOP_ALLOW_ON_US": "allow_on_us",
                "RAYLOOP_RAY_TASK_EVENTS": "ray_task_events"}
    for spelling, expected in (("1", True), ("TRUE", True), ("yes", True), (" On ", True), ("0", False),
                               ("off", False), ("", False)):
        for variable in switches:
            monkeypatch.setenv(variable, spelling)
        config = HubConfig.from_env()
        assert {field: getattr(config, field) for field in switches.values()} == dict.fromkeys(
            switches.values(), expected), spelling


def test_a_sender_that_cannot_start_drops_what_was_queued_for_it(monkeypatch):
    import subprocess

    async def main():
        sender = _sender(timeout_ms=1_000, retries=0)
        outcomes: list[Outcome] = []

        def refuse(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(subprocess, "Popen", refuse)
        try:
            assert sender.send("fsp", "PUT", "http://127.0.0.1:9/x", PUT_HEADERS, b"{}", kind="transfer_put",
                               on_outcome=outcomes.append)
            assert await sender.drain(5.0)
            assert outcomes == [Outcome.DROPPED] and sender.pending == 0
            assert sample(sender, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped") == 1
        finally:
            await sender.close()

    run(main)
