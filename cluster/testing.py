"""Run a whole hub in-process and drive its admin API: shared by the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import http.client
import json
import uuid
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg

from cluster.config import HubConfig
from cluster.hub import Hub


@asynccontextmanager
async def running_hub(database_url: str, *, shards: int = 2, **overrides):
    config = HubConfig.from_env(
        database_url=database_url,
        shard_count=shards,
        admin_port=0,
        fspiop_port=0,
        ops_grpc_port=0,
        ray_namespace=f"rayloop-test-{uuid.uuid4().hex[:8]}",
        data_dir=Path("/tmp/rayloop-test-unused"),
        **overrides,
    )
    hub = Hub(config)
    try:
        await hub.start()
        yield hub
    finally:
        await hub.stop()


def _request(port: int, method: str, path: str, body) -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw, parse_float=Decimal) if raw else None)
    finally:
        connection.close()


async def admin(hub: Hub, method: str, path: str, body=None) -> tuple[int, object]:
    return await asyncio.to_thread(_request, hub.admin_port, method, path, body)


async def onboard(hub: Hub, names: list[str], currency: str = "XTS", *, ndc: str = "10000",
                  deposit: str = "10000") -> dict[str, dict]:
    """Hub accounts, then each DFSP: participant, initial position and limits, funds in."""
    for account_type in ("HUB_MULTILATERAL_SETTLEMENT", "HUB_RECONCILIATION"):
        status, _ = await admin(hub, "POST", "/participants/Hub/accounts", {"type": account_type, "currency": currency})
        assert status in (201, 400), status
    accounts: dict[str, dict] = {}
    for name in names:
        status, body = await admin(hub, "POST", "/participants", {"name": name, "currency": currency})
        assert status == 201, body
        status, body = await admin(hub, "POST", f"/participants/{name}/initialPositionAndLimits", {
            "currency": currency, "limit": {"type": "NET_DEBIT_CAP", "value": int(ndc)}, "initialPosition": 0})
        assert status == 201, body
        status, listed = await admin(hub, "GET", f"/participants/{name}/accounts")
        assert status == 200, listed
        by_type = {a["ledgerAccountType"]: a for a in listed if a["currency"] == currency}
        accounts[name] = by_type
        status, body = await admin(hub, "POST", f"/participants/{name}/accounts/{by_type['SETTLEMENT']['id']}", {
            "transferId": str(uuid.uuid4()), "externalReference": "onboarding", "action": "recordFundsIn",
            "reason": "initial deposit", "amount": {"amount": deposit, "currency": currency}})
        assert status == 202, body
    return accounts


async def assert_conserved(hub: Hub) -> None:
    """Per currency: live (actors) and durable (Postgres) sums balance exactly."""
    connection = await asyncpg.connect(hub.database_url)
    try:
        rows = await connection.fetch("SELECT currency, imbalance FROM currency_conservation")
    finally:
        await connection.close()
    for row in rows:
        assert row["imbalance"] == 0, f"durable {row['currency']} imbalance {row['imbalance']}"
    for currency, (values, reserved, owed) in (await hub.ledger.totals()).items():
        assert values - reserved - owed == 0, f"live {currency}: {values} - {reserved} - {owed} != 0"


def start_local_ray(*, num_cpus: int | None = 2, log_to_driver: bool = True) -> None:
    """A private Ray for tests and benchmarks: always a new local instance (never one already running
    on the machine), on loopback, without the dashboard."""
    from cluster.local_ray import init_local_ray

    # The hub's own setting (RAYLOOP_RAY_WORKER_NICENESS), so tests and benchmarks run its actors as it would.
    init_local_ray(include_dashboard=False, num_cpus=num_cpus, configure_logging=False,
                   log_to_driver=log_to_driver, worker_niceness=HubConfig.from_env().ray_worker_niceness)


class HubThread:
    """A hub running on its own uvloop thread, so tests (each on its own loop) can share one hub."""

    def __init__(self, database_url: str, *, shards: int = 2, **overrides):
        import threading

        self._database_url = database_url
        self._shards = shards
        self._overrides = overrides
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.hub: Hub | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hub", daemon=True)

    def start(self) -> HubThread:
        self._thread.start()
        self._ready.wait(timeout=180)
        if self._error is not None:
            raise RuntimeError("hub failed to start") from self._error
        return self

    def _run(self) -> None:
        import uvloop

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with running_hub(self._database_url, shards=self._shards, **self._overrides) as hub:
                    self.hub = hub
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as error:  # reported to start(); the thread must not die silently
                self._error = error
                self._ready.set()

        uvloop.run(main())

    def call(self, coroutine, timeout_s: float = 60.0):
        """Run a coroutine on the hub's loop (e.g. ``assert_conserved(thread.hub)``) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    async def acall(self, coroutine, timeout_s: float = 60.0):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)

    @property
    def fspiop_url(self) -> str:
        return f"http://127.0.0.1:{self.hub.fspiop_port}"

    def admin(self, method: str, path: str, body=None) -> tuple[int, object]:
        return _request(self.hub.admin_port, method, path, body)


@contextmanager
def module_hub(database_url: str, *, hub_accounts: tuple[str, ...] = ("XTS",), **settings):
    """A private Ray and a ``HubThread`` for a test module, with the hub's accounts for ``hub_accounts``
    (currencies); both are ended on exit, also when a setup step fails."""
    import ray

    start_local_ray()
    thread = None
    try:
        thread = HubThread(database_url, **settings).start()
        for currency in hub_accounts:
            for account_type in ("HUB_MULTILATERAL_SETTLEMENT", "HUB_RECONCILIATION"):
                status, body = thread.admin("POST", "/participants/Hub/accounts",
                                            {"type": account_type, "currency": currency})
                assert status == 201, body
        yield thread
    finally:
        if thread is not None:
            thread.stop()
        ray.shutdown()


async def onboard_dfsps(hub: Hub, sim, names: list[str], currency: str = "XTS", *, ndc: str = "10000",
                        deposit: str = "10000") -> None:
    """Onboard simulated DFSPs (``sim.simulator.Simulator``) with their callback endpoints."""
    for name in names:
        sim.add_dfsp(name)
    await onboard(hub, names, currency, ndc=ndc, deposit=deposit)
    for name in names:
        for endpoint_type, value in sim.endpoints(name).items():
            status, body = await admin(hub, "POST", f"/participants/{name}/endpoints",
                                       {"type": endpoint_type, "value": value})
            assert status == 201, body


@asynccontextmanager
async def bench_environment(*, ray_logs: bool = False):
    """A fresh database (on RAYLOOP_DATABASE_URL's server, or an embedded one) and a private local
    Ray, for a benchmark; yields the database URL and removes everything afterwards."""
    import os

    import ray

    url = os.environ.get("RAYLOOP_DATABASE_URL")
    embedded = None
    if not url:
        from cluster.postgres import EmbeddedPostgres

        embedded = EmbeddedPostgres(Path(".rayloop/bench-pgdata").resolve())
        url = await asyncio.to_thread(embedded.start)
    # A fresh database, so results do not depend on earlier runs.
    name = f"rayloop_bench_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(url)
    await connection.execute(f"CREATE DATABASE {name}")
    start_local_ray(num_cpus=None, log_to_driver=ray_logs)
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        ray.shutdown()
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await connection.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
