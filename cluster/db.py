"""Postgres access shared by every process: pools and versioned schema migrations."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_KEY = 0x7261796C6F6F70


def migration_files() -> list[tuple[int, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    versions = [v for v, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


async def migrate(dsn: str) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction. Returns those applied."""
    connection = await asyncpg.connect(dsn)
    applied: list[int] = []
    try:
        # Several processes may start at once (hub, tests); the advisory lock serialises them.
        await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migration ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migration")}
        for version, path in migration_files():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(path.read_text())
                await connection.execute(
                    "INSERT INTO schema_migration (version, name) VALUES ($1, $2)", version, path.name
                )
            applied.append(version)
            log.info("applied migration %s", path.name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
        await connection.close()
    return applied


async def skip_session_reset(connection: asyncpg.Connection) -> None:
    """A pool ``reset`` for code that leaves no session state behind (no SET, LISTEN, session advisory
    locks or cursors outside a transaction). asyncpg's default reset sends a query (``RESET ALL``,
    ``UNLISTEN *`` and more) on every release, a round trip per use; an open transaction is still
    rolled back by asyncpg itself before this is called."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60)


async def reset_database(dsn: str) -> None:
    """Drop every rayloop table (tests and `rayloop up --reset` only)."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await connection.close()
