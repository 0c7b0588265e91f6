"""api.fspiop.callbacks: endpoint templates (against real Postgres), headers, and delivery over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime

import asyncpg
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from api.fspiop.callbacks import (
    CallbackDispatcher,
    CallbackMetrics,
    EndpointDirectory,
    Outcome,
    expand,
    forward_headers,
    hub_headers,
)
from api.http import ClientPool, HttpServer, Request, Response

TRANSFER_ID = "b51ec534-ee48-4575-b6a9-ead2955b8069"


def run(main: Callable[[], Awaitable[None]]) -> None:
    """A fresh uvloop loop per test, failing the test on any exception the loop had to swallow."""

    async def wrapper() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        unhandled: list[dict] = []
        loop.set_exception_handler(lambda _, context: unhandled.append(context))
        await main()
        await asyncio.sleep(0)
        assert not unhandled, unhandled

    uvloop.run(wrapper())


class Dfsp:
    """A fake DFSP: records requests; ``statuses`` are answered in turn (then 200); ``delay_s`` per request."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0):
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()
        self.expect = 1

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if len(self.requests) >= self.expect:
            self.arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return Response(status, b'{"errorInformation":{"errorCode":"3100"}}' if status >= 400 else b"")


@asynccontextmanager
async def serving(dfsp: Dfsp) -> AsyncIterator[str]:
    """Serve ``dfsp`` on a free loopback port; yields its base URL."""
    server = HttpServer(dfsp, "127.0.0.1", 0)
    port = await server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


@asynccontextmanager
async def dispatching(**options) -> AsyncIterator[CallbackDispatcher]:
    options.setdefault("metrics", CallbackMetrics(CollectorRegistry()))
    dispatcher = CallbackDispatcher(**options)
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample(dispatcher: CallbackDispatcher, name: str, **labels: str) -> float:
    value = dispatcher.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


PUT_HEADERS = hub_headers(
    resource="transfers", version="1.1", source="payeefsp", destination="payerfsp", method="PUT",
    uri=f"/transfers/{TRANSFER_ID}",
)


# --------------------------------------------------------------------------------------------------
# Templates


def test_expand_substitutes_and_percent_encodes():
    template = "http://dfsp:3000/transfers/{{transferId}}/error"
    assert expand(template, transferId=TRANSFER_ID) == f"http://dfsp:3000/transfers/{TRANSFER_ID}/error"
    # '/', '?', '#', '%', spaces and non-ASCII are encoded; '+' (MSISDNs) and ':' / '@' are not.
    parties = "http://dfsp/parties/{{partyIdType}}/{{partyIdentifier}}/{{partySubIdOrType}}"
    assert expand(parties, partyIdType="MSISDN", partyIdentifier="+254 7/1?x#%", partySubIdOrType="é@:") == (
        "http://dfsp/parties/MSISDN/+254%207%2F1%3Fx%23%25/%C3%A9@:"
    )
    # Whitespace inside the braces is tolerated, as Mustache does; non-string values are str()-ed.
    assert expand("http://dfsp/participants/{{ requestId }}", requestId=42) == "http://dfsp/participants/42"
    # Base URLs are joined with the caller's path with exactly one slash, whatever the template ends with.
    assert expand("http://dfsp/quotes-api/", path="/quotes/123") == "http://dfsp/quotes-api/quotes/123"
    assert expand("http://dfsp/quotes-api", path="quotes/123/error") == "http://dfsp/quotes-api/quotes/123/error"
    assert expand("http://dfsp/plain") == "http://dfsp/plain"
    with pytest.raises(ValueError, match="transferId"):
        expand(template, id=TRANSFER_ID)


# --------------------------------------------------------------------------------------------------
# EndpointDirectory, on real Postgres


async def _participant(pool: asyncpg.Pool, name: str, endpoints: dict[str, str]) -> None:
    participant_id = await pool.fetchval(
        "INSERT INTO participant (name, shard_id) VALUES ($1, 0) RETURNING participant_id", name
    )
    for endpoint_type, value in endpoints.items():
        await pool.execute(
            "INSERT INTO participant_endpoint (participant_id, endpoint_type, value) VALUES ($1, $2, $3)",
            participant_id, endpoint_type, value,
        )


def test_endpoint_directory_loads_expands_and_refreshes(database_url):
    async def scenario():
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        directory = EndpointDirectory(pool, refresh_ms=100, reload_min_interval_ms=60_000)
        try:
            await pool.execute("INSERT INTO shard (shard_id) VALUES (0)")
            await _participant(pool, "payerfsp", {
                "FSPIOP_CALLBACK_URL_TRANSFER_PUT": "http://payer:4000/transfers/{{transferId}}",
                "FSPIOP_CALLBACK_URL_TRANSFER_ERROR": "http://payer:4000/transfers/{{transferId}}/error",
                "FSPIOP_CALLBACK_URL_QUOTES": "http://payer:4000/",
                "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT":
                    "http://payer:4000/parties/{{partyIdType}}/{{partyIdentifier}}/{{partySubIdOrType}}",
            })
            await directory.start()
            assert directory.reloads == 1
            assert directory.url("payerfsp", "FSPIOP_CALLBACK_URL_TRANSFER_PUT", transferId=TRANSFER_ID) == (
                f"http://payer:4000/transfers/{TRANSFER_ID}"
            )
            assert directory.url("payerfsp", "FSPIOP_CALLBACK_URL_TRANSFER_ERROR", transferId="a b") == (
                "http://payer:4000/transfers/a%20b/error"
            )
            assert directory.url("payerfsp", "FSPIOP_CALLBACK_URL_QUOTES", path="/quotes/q1") == (
                "http://payer:4000/quotes/q1"
            )
            assert directory.url(
                "payerfsp", "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT",
                partyIdType="PERSONAL_ID", partyIdentifier="16135551212", partySubIdOrType="DRIVING_LICENSE",
            ) == "http://payer:4000/parties/PERSONAL_ID/16135551212/DRIVING_LICENSE"
            # Missing endpoint type, or unknown participant: None.
            assert directory.url("payerfsp", "FSPIOP_CALLBACK_URL_BULK_TRANSFER_PUT", id="x") is None
            assert directory.url("nobody", "FSPIOP_CALLBACK_URL_TRANSFER_PUT", transferId="x") is None

            # An endpoint changed by the admin API shows up after the background refresh.
            await pool.execute(
                "UPDATE participant_endpoint SET value = 'http://payer2:4000/transfers/{{transferId}}'"
                " WHERE endpoint_type = 'FSPIOP_CALLBACK_URL_TRANSFER_PUT'"
            )
            async with asyncio.timeout(5):
                while directory.url("payerfsp", "FSPIOP_CALLBACK_URL_TRANSFER_PUT", transferId="t") != (
                    "http://payer2:4000/transfers/t"
                ):
                    await asyncio.sleep(0.02)
            assert directory.endpoints("payerfsp")["FSPIOP_CALLBACK_URL_TRANSFER_PUT"] == (
                "http://payer2:4000/transfers/{{transferId}}"
            )
        finally:
            await directory.stop()
            await pool.close()

    run(scenario)


def test_endpoint_directory_reloads_on_a_miss_at_a_bounded_rate(database_url):
    async def scenario():
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        # No periodic refresh during the test: only on-demand reloads can find the new participant.
        directory = EndpointDirectory(pool, refresh_ms=600_000, reload_min_interval_ms=300)
        try:
            await pool.execute("INSERT INTO shard (shard_id) VALUES (0)")
            await directory.start()
            assert directory.reloads == 1
            await asyncio.sleep(0.35)
            await _participant(pool, "newfsp", {"FSPIOP_CALLBACK_URL_TRANSFER_POST": "http://new:4000/transfers"})

            # resolve() waits for an on-demand reload on a miss.
            assert await directory.resolve("newfsp", "FSPIOP_CALLBACK_URL_TRANSFER_POST") == (
                "http://new:4000/transfers"
            )
            assert directory.reloads == 2

            # A storm of misses for a DFSP without endpoints costs no extra query within the interval...
            for _ in range(100):
                assert directory.url("ghost", "FSPIOP_CALLBACK_URL_TRANSFER_PUT", transferId="t") is None
                assert await directory.resolve("ghost", "FSPIOP_CALLBACK_URL_TRANSFER_PUT", transferId="t") is None
            await asyncio.sleep(0.05)
            assert directory.reloads == 2

            # ...and once the interval has passed, a miss in url() schedules one background reload.
            await _participant(pool, "late", {"FSPIOP_CALLBACK_URL_TRANSFER_POST": "http://late/transfers"})
            await asyncio.sleep(0.35)
            assert directory.url("late", "FSPIOP_CALLBACK_URL_TRANSFER_POST") is None
            assert directory.url("late", "FSPIOP_CALLBACK_URL_TRANSFER_POST") is None  # joins, no second query
            async with asyncio.timeout(5):
                while directory.reloads < 3:
                    await asyncio.sleep(0.01)
            assert directory.url("late", "FSPIOP_CALLBACK_URL_TRANSFER_POST") == "http://late/transfers"
            assert directory.reloads == 3
        finally:
            await directory.stop()
            await pool.close()

    run(scenario)


# --------------------------------------------------------------------------------------------------
# Headers


def test_forward_headers_keeps_fspiop_headers_and_drops_hop_by_hop():
    incoming = {
        "host": "hub:3000",
        "content-length": "123",
        "connection": "keep-alive",
        "keep-alive": "timeout=5",
        "transfer-encoding": "chunked",
        "expect": "100-continue",
        "user-agent": "curl",
        "accept": "application/vnd.interoperability.transfers+json;version=1",
        "content-type": "application/vnd.interoperability.transfers+json;version=1.1",
        "date": "Tue, 15 Nov 1994 08:12:31 GMT",
        "fspiop-source": "payerfsp",
        "fspiop-destination": "payeefsp",
        "fspiop-signature": '{"signature":"abc","protectedHeader":"def"}',
        "fspiop-uri": "/transfers",
        "fspiop-http-method": "POST",
        "fspiop-encryption": '{"encryptedFields":{}}',
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "payerfsp=t61rcWkgMzE",
        "x-forwarded-for": "10.0.0.1",
    }
    forwarded = forward_headers(incoming, method="POST")
    assert forwarded == [
        ("Content-Type", "application/vnd.interoperability.transfers+json;version=1.1"),
        ("Accept", "application/vnd.interoperability.transfers+json;version=1"),
        ("Date", "Tue, 15 Nov 1994 08:12:31 GMT"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("FSPIOP-Source", "payerfsp"),
        ("FSPIOP-Destination", "payeefsp"),
        ("FSPIOP-Encryption", '{"encryptedFields":{}}'),
        ("FSPIOP-Signature", '{"signature":"abc","protectedHeader":"def"}'),
        ("FSPIOP-URI", "/transfers"),
        ("FSPIOP-HTTP-Method", "POST"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", "payerfsp=t61rcWkgMzE"),
    ]
    # A callback (PUT) or notification (PATCH) never carries Accept, even if the sender sent one.
    for method in ("PUT", "PATCH", "put"):
        assert "Accept" not in dict(forward_headers(incoming, method=method))
    assert "Accept" in dict(forward_headers(incoming, method="get"))
    # Any capitalisation in, canonical out; a missing Destination is filled only when asked to.
    mixed = {"Content-Type": "x", "FSPIOP-SOURCE": "payerfsp", "Fspiop-Uri": "/parties/MSISDN/1"}
    assert forward_headers(mixed, method="GET") == [
        ("Content-Type", "x"), ("FSPIOP-Source", "payerfsp"), ("FSPIOP-URI", "/parties/MSISDN/1")
    ]
    assert dict(forward_headers(mixed, method="GET", destination="payeefsp"))["FSPIOP-Destination"] == "payeefsp"
    assert dict(forward_headers(incoming, method="PUT", destination="other"))["FSPIOP-Destination"] == "payeefsp"


def test_hub_headers():
    error = hub_headers(
        resource="transfers", version="1.1", source="Hub", destination="payerfsp", method="PUT",
        uri=f"/transfers/{TRANSFER_ID}/error", date="Tue, 15 Nov 1994 08:12:31 GMT",
    )
    assert error == [
        ("Content-Type", "application/vnd.interoperability.transfers+json;version=1.1"),
        ("Date", "Tue, 15 Nov 1994 08:12:31 GMT"),
        ("FSPIOP-Source", "Hub"),
        ("FSPIOP-Destination", "payerfsp"),
        ("FSPIOP-HTTP-Method", "PUT"),
        ("FSPIOP-URI", f"/transfers/{TRANSFER_ID}/error"),
    ]
    patch = dict(hub_headers(resource="transfers", version="1.1", source="Hub", destination="payeefsp",
                             method="patch", uri=f"/transfers/{TRANSFER_ID}"))
    assert "Accept" not in patch and patch["FSPIOP-HTTP-Method"] == "PATCH"
    # The Date defaults to now, as an IMF-fixdate.
    assert patch["Date"].endswith(" GMT") and parsedate_to_datetime(patch["Date"]).tzinfo is not None
    get = dict(hub_headers(resource="parties", version="1.0", source="Hub", destination="payeefsp",
                           method="GET", uri="/parties/MSISDN/123"))
    assert get["Accept"] == "application/vnd.interoperability.parties+json;version=1"
    assert get["Content-Type"] == "application/vnd.interoperability.parties+json;version=1.0"


# --------------------------------------------------------------------------------------------------
# Delivery


def test_delivers_method_headers_and_body():
    async def scenario():
        dfsp = Dfsp()
        async with serving(dfsp) as base, dispatching() as dispatcher:
            url = f"{base}/transfers/{TRANSFER_ID}"
            body = b'{"transferState":"COMMITTED"}'
            # An Accept slipped into a PUT's headers is removed on the way out.
            headers = [*PUT_HEADERS, ("Accept", "application/vnd.interoperability.transfers+json;version=1")]
            outcome = await dispatcher.send_and_wait("payerfsp", "PUT", url, headers, body, kind="transfer_put")
            assert outcome is Outcome.DELIVERED
            (request,) = dfsp.requests
            assert (request.method, request.path, request.body) == ("PUT", f"/transfers/{TRANSFER_ID}", body)
            assert request.headers["fspiop-source"] == "payeefsp"
            assert request.headers["fspiop-destination"] == "payerfsp"
            assert request.headers["content-type"] == "application/vnd.interoperability.transfers+json;version=1.1"
            assert "accept" not in request.headers

            # Fire and forget: send() returns at once, the request follows.
            assert dispatcher.send("payerfsp", "PUT", url, PUT_HEADERS, body, kind="transfer_put")
            assert len(dfsp.requests) == 1 and dispatcher.pending == 1
            assert await dispatcher.drain(5)
            assert len(dfsp.requests) == 2 and dispatcher.pending == 0
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="delivered") == 2

    run(scenario)


def test_retries_5xx_then_delivers():
    async def scenario():
        dfsp = Dfsp(statuses=[500, 503])
        async with serving(dfsp) as base, dispatching(retries=2, backoff_ms=10) as dispatcher:
            outcome = await dispatcher.send_and_wait(
                "payerfsp", "PUT", f"{base}/transfers/t1", PUT_HEADERS, b"{}", kind="transfer_put"
            )
            assert outcome is Outcome.DELIVERED and len(dfsp.requests) == 3

            # Out of retries: failed.
            dfsp.statuses = [500, 500, 500, 500]
            outcome = await dispatcher.send_and_wait(
                "payerfsp", "PUT", f"{base}/transfers/t2", PUT_HEADERS, b"{}", kind="transfer_put"
            )
            assert outcome is Outcome.FAILED and len(dfsp.requests) == 6
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="failed") == 1

    run(scenario)


def test_4xx_is_rejected_without_retry():
    async def scenario():
        dfsp = Dfsp(statuses=[400])
        async with serving(dfsp) as base, dispatching(retries=2, backoff_ms=10) as dispatcher:
            outcome = await dispatcher.send_and_wait(
                "payerfsp", "PUT", f"{base}/transfers/t1/error", PUT_HEADERS, b"{}", kind="transfer_error"
            )
            assert outcome is Outcome.REJECTED and len(dfsp.requests) == 1
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_error", outcome="rejected") == 1

    run(scenario)


async def _two_attempts_of_100_ms(pool: ClientPool | None = None) -> CallbackDispatcher:
    """A DFSP that answers after 1 s, a dispatcher allowing 100 ms and one retry: the callback fails
    after two attempts, well before the DFSP (or a pool's own, longer, timeout) would have answered."""
    dfsp = Dfsp(delay_s=1.0)
    async with serving(dfsp) as base, dispatching(pool=pool, timeout_ms=100, retries=1, backoff_ms=10) as dispatcher:
        started = asyncio.get_running_loop().time()
        outcome = await dispatcher.send_and_wait(
            "payeefsp", "PATCH", f"{base}/transfers/t1", PUT_HEADERS, b"{}", kind="transfer_patch"
        )
        elapsed = asyncio.get_running_loop().time() - started
        assert outcome is Outcome.FAILED and len(dfsp.requests) == 2
        assert 0.2 <= elapsed < 0.9
        return dispatcher


def test_timeout_is_retried_then_fails():
    async def scenario():
        dispatcher = await _two_attempts_of_100_ms()
        assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_patch", outcome="failed") == 1
        assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_patch", outcome="delivered") == 0

    run(scenario)


def test_a_shared_pool_with_a_longer_timeout_still_gets_the_dispatchers_limit():
    """A pool the dispatcher does not own may allow 30 s; the dispatcher's 100 ms still bounds each attempt."""
    async def scenario():
        pool = ClientPool(request_timeout_s=30.0)
        try:
            await _two_attempts_of_100_ms(pool)
        finally:
            await pool.close()

    run(scenario)


def test_unusable_url_fails_without_retry():
    async def scenario():
        async with dispatching(retries=2) as dispatcher:
            outcome = await dispatcher.send_and_wait(
                "payerfsp", "PUT", "https://dfsp/transfers/t1", PUT_HEADERS, b"{}", kind="transfer_put"
            )
            assert outcome is Outcome.FAILED

    run(scenario)


def test_slow_and_dead_dfsps_do_not_delay_others():
    async def scenario():
        healthy, slow = Dfsp(), Dfsp(delay_s=2.0)
        healthy.expect = 200
        dead = f"http://127.0.0.1:{closed_port()}"
        async with (
            serving(healthy) as healthy_base,
            serving(slow) as slow_base,
            dispatching(concurrency_per_fsp=4, timeout_ms=5_000, retries=2, backoff_ms=300) as dispatcher,
        ):
            loop = asyncio.get_running_loop()
            for n in range(50):
                assert dispatcher.send("slowfsp", "PUT", f"{slow_base}/transfers/s{n}", PUT_HEADERS, b"{}",
                                       kind="transfer_put")
                assert dispatcher.send("deadfsp", "PUT", f"{dead}/transfers/d{n}", PUT_HEADERS, b"{}",
                                       kind="transfer_put")
            await asyncio.sleep(0.05)  # the slow and dead DFSPs' workers are now all busy
            started = loop.time()
            for n in range(200):
                assert dispatcher.send("healthyfsp", "PUT", f"{healthy_base}/transfers/h{n}", PUT_HEADERS, b"{}",
                                       kind="transfer_put")
            async with asyncio.timeout(1.0):
                await healthy.arrived.wait()
                while sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="delivered") < 200:
                    await asyncio.sleep(0.005)
            assert loop.time() - started < 1.0
            # Meanwhile the other two are still working through their own backlogs.
            assert dispatcher.queue_depth("healthyfsp") == 0
            assert dispatcher.queue_depth("slowfsp") > 0 and dispatcher.queue_depth("deadfsp") > 0
            assert len(slow.requests) <= 4  # never more than concurrency_per_fsp at once
            registry = dispatcher.metrics.registry
            assert registry.get_sample_value("rayloop_callback_queue_depth", {"fsp": "slowfsp"}) > 0
            assert registry.get_sample_value("rayloop_callback_queue_depth", {"fsp": "healthyfsp"}) == 0
            # close() abandons the backlog, counting it as dropped.
            await dispatcher.close()
            dropped = sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped")
            failed = sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="failed")
            assert dropped + failed == 100 and dropped > 0

    run(scenario)


def test_full_queue_drops():
    async def scenario():
        dfsp = Dfsp()
        async with serving(dfsp) as base, dispatching(queue_max_per_fsp=2, concurrency_per_fsp=1) as dispatcher:
            url = f"{base}/transfers/t"
            # No await in between: the worker has not taken anything off the queue yet.
            assert dispatcher.send("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put")
            assert dispatcher.send("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put")
            assert not dispatcher.send("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put")
            assert await dispatcher.send_and_wait(
                "payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_error"
            ) is Outcome.DROPPED
            # Another DFSP's queue is unaffected.
            assert dispatcher.send("payeefsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put")
            assert dispatcher.queue_depth("payerfsp") == 2
            assert await dispatcher.drain(5)
            assert len(dfsp.requests) == 3
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped") == 1
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_error", outcome="dropped") == 1
            assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="delivered") == 3
        # After close nothing is accepted.
        assert not dispatcher.send("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put")
        assert sample(dispatcher, "rayloop_callbacks_total", kind="transfer_put", outcome="dropped") == 2

    run(scenario)


def test_every_outcome_of_a_kind_exists_at_zero_from_its_first_callback():
    """Prometheus's rate() cannot see the increment that creates a series: the dashboard's error panel would
    miss a DFSP's first rejected or dropped callbacks if those series appeared with them. They are created,
    at 0, when the first callback of a kind is sent."""
    async def scenario():
        registry = CollectorRegistry()
        async with dispatching(metrics=CallbackMetrics(registry), queue_max_per_fsp=1,
                               concurrency_per_fsp=1) as dispatcher:
            url = f"http://127.0.0.1:{closed_port()}/transfers/t"

            def counts(kind: str) -> dict[str, float | None]:
                return {str(o): registry.get_sample_value("rayloop_callbacks_total", {"kind": kind, "outcome": str(o)})
                        for o in Outcome}

            assert set(counts("transfer_patch").values()) == {None}
            # Queued (no await: the worker has not taken it), so no outcome yet; the series exist, at 0.
            assert dispatcher.send("payerfsp", "PATCH", url, PUT_HEADERS, b"{}", kind="transfer_patch")
            assert set(counts("transfer_patch").values()) == {0}
            # The queue is full: the drop is an increment of a series a scrape could already have seen.
            assert not dispatcher.send("payerfsp", "PATCH", url, PUT_HEADERS, b"{}", kind="transfer_patch")
            assert counts("transfer_patch") == {"delivered": 0, "rejected": 0, "failed": 0, "dropped": 1}

    run(scenario)


def test_metrics():
    async def scenario():
        registry = CollectorRegistry()
        dfsp = Dfsp(statuses=[200, 404])
        async with serving(dfsp) as base, dispatching(metrics=CallbackMetrics(registry)) as dispatcher:
            url = f"{base}/transfers/t"
            assert await dispatcher.send_and_wait("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put") \
                is Outcome.DELIVERED
            assert await dispatcher.send_and_wait("payerfsp", "PUT", url, PUT_HEADERS, b"{}", kind="transfer_put") \
                is Outcome.REJECTED
            assert await dispatcher.send_and_wait("payeefsp", "POST", url, PUT_HEADERS, b"{}", kind="transfer_post") \
                is Outcome.DELIVERED

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("rayloop_callbacks_total", kind="transfer_put", outcome="delivered") == 1
        assert value("rayloop_callbacks_total", kind="transfer_put", outcome="rejected") == 1
        assert value("rayloop_callbacks_total", kind="transfer_post", outcome="delivered") == 1
        assert value("rayloop_callback_seconds_count", kind="transfer_put", outcome="delivered") == 1
        assert value("rayloop_callback_seconds_count", kind="transfer_post", outcome="delivered") == 1
        # Loopback: well under a second, and measured (not rounded to 0 by a coarse clock).
        assert value("rayloop_callback_seconds_bucket", kind="transfer_put", outcome="delivered", le="1.0") == 1
        assert 0 < value("rayloop_callback_seconds_sum", kind="transfer_put", outcome="delivered") < 1
        assert value("rayloop_callback_queue_depth", fsp="payerfsp") == 0
        assert value("rayloop_callback_queue_depth", fsp="payeefsp") == 0
        # A second metrics object on the same registry is refused; a fresh registry is fine.
        with pytest.raises(ValueError):
            CallbackMetrics(registry)
        CallbackMetrics(CollectorRegistry())

    run(scenario)


def test_queue_depth_gauge_sums_the_dispatchers_of_a_process_and_forgets_a_closed_one():
    async def scenario():
        registry = CollectorRegistry()
        shared = CallbackMetrics(registry)
        dead = f"http://127.0.0.1:{closed_port()}"

        def depth() -> float:
            return registry.get_sample_value("rayloop_callback_queue_depth", {"fsp": "deadfsp"})

        # One worker each, long backoff: the first callback is in flight, the rest wait in the queue.
        options = dict(metrics=shared, concurrency_per_fsp=1, retries=1, backoff_ms=5_000, backoff_max_ms=5_000)
        async with dispatching(**options) as first, dispatching(**options) as second:
            for n in range(4):
                assert first.send("deadfsp", "PUT", f"{dead}/transfers/a{n}", PUT_HEADERS, b"{}", kind="transfer_put")
            for n in range(3):
                assert second.send("deadfsp", "PUT", f"{dead}/transfers/b{n}", PUT_HEADERS, b"{}", kind="transfer_put")
            await asyncio.sleep(0.05)  # each worker took its first callback
            assert (first.queue_depth("deadfsp"), second.queue_depth("deadfsp")) == (3, 2)
            assert depth() == 5  # read when scraped, summed over both
            await first.close()
            assert depth() == 2  # the closed one no longer counts
            await second.close()
            assert depth() == 0

    run(scenario)
