"""Shared fixtures: a real Postgres (the CI server, or an embedded one), a fresh database per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest

from cluster.db import migrate

_TEMPLATE = f"rayloop_tmpl_{os.getpid()}"


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def server_url():
    """A Postgres server URL: RAYLOOP_DATABASE_URL when set, else an embedded server for the session."""
    url = os.environ.get("RAYLOOP_DATABASE_URL")
    if url:
        yield url
        return
    from cluster.postgres import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="rayloop-test-pg-"))
    data_dir.chmod(0o755)  # the server may run as the unprivileged postgres user
    server = EmbeddedPostgres(data_dir / "pgdata")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def template_url(server_url):
    """A migrated template database; every test clones it (fast, and isolated)."""
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {_TEMPLATE}"))
    asyncio.run(_admin(server_url, f"CREATE DATABASE {_TEMPLATE}"))
    url = _with_database(server_url, _TEMPLATE)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {_TEMPLATE} WITH (FORCE)"))


@pytest.fixture
def database_url(server_url, template_url):
    name = f"rayloop_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}"))
    yield _with_database(server_url, name)
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def module_database_url(server_url, template_url):
    """One database for a module whose tests share a hub."""
    name = f"rayloop_m_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}"))
    yield _with_database(server_url, name)
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
