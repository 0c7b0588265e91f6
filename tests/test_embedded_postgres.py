"""EmbeddedPostgres: exact NUMERIC round trip, durability across restarts and a killed owner, clean stop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from cluster.postgres import EmbeddedPostgres, _fallback_dir, resolve_database_url

ROOT = Path(__file__).resolve().parents[1]
AMOUNT = Decimal("12345678901234567890123456789012.3456")  # 38 digits, 4 after the point


@pytest.fixture
def pg_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory under tmp_path. As root the server relocates it to /tmp when the postgres user cannot
    reach tmp_path (pytest's base directory is 0700); that fallback is removed here too."""
    data_dir = tmp_path / "pgdata"
    yield data_dir
    fallback = _fallback_dir(data_dir.resolve())
    if fallback.exists():
        shutil.rmtree(fallback, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _write(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE TABLE balance (id int PRIMARY KEY, amount NUMERIC(38,4) NOT NULL)")
        await connection.execute("INSERT INTO balance VALUES (1, $1)", AMOUNT)
    finally:
        await connection.close()


async def _read(url: str) -> Decimal:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval("SELECT amount FROM balance WHERE id = 1")
    finally:
        await connection.close()


def test_round_trip_restart_and_stop(pg_dir: Path) -> None:
    server = EmbeddedPostgres(pg_dir)
    try:
        url = server.start()
        assert url.startswith("postgresql://postgres@127.0.0.1:") and url.endswith("/rayloop")
        assert server.start() == url  # idempotent
        asyncio.run(_write(url))
        value = asyncio.run(_read(url))
        assert value == AMOUNT and str(value) == str(AMOUNT)
        first_port = server.port
        assert first_port is not None
        server.stop()
        server.stop()  # idempotent
        assert not _port_open(first_port)

        # A new instance on the same directory reuses it (no initdb) and still has the committed row.
        server = EmbeddedPostgres(pg_dir)
        url = server.start()
        assert asyncio.run(_read(url)) == AMOUNT
        port = server.port
        assert port is not None
    finally:
        server.stop()
    assert not _port_open(port)
    with pytest.raises(RuntimeError):
        _ = server.url


_OWNER = textwrap.dedent(
    """
    import asyncio, sys
    import asyncpg
    from cluster.postgres import EmbeddedPostgres

    async def write(url):
        connection = await asyncpg.connect(url)
        await connection.execute("CREATE TABLE balance (id int PRIMARY KEY, amount NUMERIC(38,4) NOT NULL)")
        await connection.execute("INSERT INTO balance VALUES (1, $1)", sys.argv[2])
        await connection.close()

    server = EmbeddedPostgres(sys.argv[1])
    asyncio.run(write(server.start()))
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    print(pid, server.port, flush=True)
    sys.stdin.read()  # hold the server until killed
    """
)


@pytest.mark.parametrize("victim", ["postmaster", "owner"])
def test_start_after_sigkill(pg_dir: Path, victim: str) -> None:
    """A hub killed with SIGKILL (stale postmaster.pid, or an orphaned server still running) must not block
    the next start, and a committed row survives."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(pg_dir), str(AMOUNT)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    server = EmbeddedPostgres(pg_dir)
    postmaster = None
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, "owner process failed to start PostgreSQL"
        postmaster, old_port = (int(part) for part in line.split())
        if victim == "postmaster":
            os.kill(postmaster, signal.SIGKILL)
        owner.kill()  # SIGKILL: no atexit, so an orphaned server stays up in the "owner" case
        owner.wait(timeout=30)

        url = server.start()
        assert asyncio.run(_read(url)) == AMOUNT
        new_postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        if new_postmaster != postmaster:
            assert not _postmaster_alive(postmaster)  # the orphan was stopped, not left beside the new one
        if server.port != old_port:
            assert not _port_open(old_port)
    finally:
        owner.kill()
        owner.wait(timeout=30)
        server.stop()
        if postmaster is not None and _postmaster_alive(postmaster):
            os.kill(postmaster, signal.SIGKILL)


def _postmaster_alive(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False


def test_resolve_database_url_prefers_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = "postgresql://someone:secret@db.example:6543/ledger?sslmode=require"
    monkeypatch.setenv("RAYLOOP_DATABASE_URL", url)
    assert resolve_database_url(tmp_path / "unused") == (url, None)
    assert not (tmp_path / "unused").exists()


def test_resolve_database_url_embedded(monkeypatch: pytest.MonkeyPatch, pg_dir: Path) -> None:
    monkeypatch.delenv("RAYLOOP_DATABASE_URL", raising=False)
    url, server = resolve_database_url(pg_dir)
    assert server is not None
    try:
        assert url == server.url
        assert _port_open(server.port or 0)
    finally:
        server.stop()
