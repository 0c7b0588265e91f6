"""Participants as the FSPIOP ingress needs them: active flags, shards and accounts, cached.

The shards own the live flags; this cache is refreshed from Postgres (which the shards write
behind) every ``refresh_ms`` and on a miss, so a DFSP onboarded a moment ago is found.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from cluster import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccountInfo:
    account_id: int
    is_active: bool


@dataclass(frozen=True, slots=True)
class ParticipantInfo:
    name: str
    is_active: bool
    is_hub: bool
    shard_id: int
    accounts: dict[tuple[str, str], AccountInfo] = field(default_factory=dict)  # (currency, type) -> account

    def account(self, currency: str, account_type: str = "POSITION") -> AccountInfo | None:
        return self.accounts.get((currency, account_type))


class ParticipantDirectory:
    def __init__(self, pool: asyncpg.Pool, *, refresh_ms: int = 2_000):
        self.pool = pool
        self.refresh_ms = refresh_ms
        self._participants: dict[str, ParticipantInfo] = {}
        self._last_reload = 0.0
        self._reloading: asyncio.Task | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="participant-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def get(self, name: str) -> ParticipantInfo | None:
        return self._participants.get(name)

    async def resolve(self, name: str, *, since: float | None = None) -> ParticipantInfo | None:
        """Like ``get``; on a miss, makes sure the cache was loaded after ``since`` (a monotonic time,
        default now) and looks again, so a DFSP onboarded before the request arrived is found."""
        found = self._participants.get(name)
        if found is None:
            metrics.PARTICIPANT_DIRECTORY_MISS.inc()
            await self.refresh(since=since)
            found = self._participants.get(name)
        else:
            metrics.PARTICIPANT_DIRECTORY_HIT.inc()
        return found

    async def refresh(self, *, since: float | None = None) -> None:
        """Reload unless a load started after ``since``: before refusing anything on the cache's word.

        Concurrent callers share one query, so a burst of misses costs one reload, not one each.
        """
        since = time.monotonic() if since is None else since
        for _ in range(2):  # the second time when the load we joined had started before ``since``
            if self._last_reload > since:
                return
            await self.reload()

    async def reload(self) -> None:
        # Concurrent misses share one query: one that started before them would be stale, so a
        # caller arriving while a load runs waits for it and then, if needed, for one more.
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._load())
        await asyncio.shield(self._reloading)

    async def _load(self) -> None:
        self._last_reload = time.monotonic()
        rows = await self.pool.fetch(
            "SELECT p.name, p.is_active, p.is_hub, p.shard_id, a.account_id, a.currency, a.ledger_account_type,"
            " a.is_active AS account_active FROM participant p LEFT JOIN account a USING (participant_id)"
        )
        participants: dict[str, ParticipantInfo] = {}
        for row in rows:
            info = participants.get(row["name"])
            if info is None:
                info = ParticipantInfo(row["name"], row["is_active"], row["is_hub"], row["shard_id"], {})
                participants[row["name"]] = info
            if row["account_id"] is not None:
                info.accounts[(row["currency"].strip(), row["ledger_account_type"])] = AccountInfo(
                    row["account_id"], row["account_active"]
                )
        self._participants = participants

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_ms / 1000)
            try:
                await self.reload()
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("participant directory refresh failed: %r", error)
