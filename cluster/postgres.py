"""A private PostgreSQL for a dev hub: initdb once under a data directory, start on 127.0.0.1, stop on exit.

Binaries come from PATH (``initdb``/``pg_ctl``/``postgres``) or, failing that, from the ``pgserver`` wheel.
PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` system user.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger(__name__)

DATABASE = "rayloop"
SUPERUSER = "postgres"  # initdb -U: the role name in the DSN, whichever OS user runs the server
HOST = "127.0.0.1"
LOG_NAME = "server.log"

# Durability matters: this is a ledger, so no fsync/synchronous_commit shortcuts even in dev.
SETTINGS: dict[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "100",
    "shared_buffers": "128MB",
}

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, minus the NUL
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Binaries:
    initdb: str
    pg_ctl: str
    origin: str  # "PATH" or "pgserver", for logs and errors


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged OS user the server runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


class EmbeddedPostgres:
    """Starts a private PostgreSQL under a data directory and stops it on exit."""

    def __init__(
        self, data_dir: str | os.PathLike[str], port: int | None = None, startup_timeout_s: float = 60.0
    ) -> None:
        self._requested_dir = Path(data_dir).expanduser().absolute()
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._mutex = threading.RLock()
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._url: str | None = None
        self._bins: _Binaries | None = None
        self._run_as: _RunAs | None = None
        self._dir_lock_fd: int | None = None
        self._owner_pid: int | None = None
        self._atexit_registered = False

    # -- public API -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not running; call start() first")
        return self._url

    @property
    def data_dir(self) -> Path:
        """The directory in use: the one given, or its /tmp fallback when the server user can't reach it."""
        return self._data_dir if self._data_dir is not None else self._requested_dir

    @property
    def port(self) -> int | None:
        return self._port

    def start(self) -> str:
        with self._mutex:
            if self._url is not None:
                return self._url
            self._bins = _find_binaries()
            self._run_as = _run_as_user()
            if self._run_as is not None:
                _require_traversable(Path(self._bins.pg_ctl).parent, self._run_as, what="PostgreSQL binaries")
            self._data_dir = self._prepare_data_dir()
            self._claim_data_dir()
            try:
                if not (self._data_dir / "PG_VERSION").exists():
                    self._initdb()
                else:
                    log.info("reusing initialised PostgreSQL data directory %s", self._data_dir)
                self._stop_leftover_server()
                self._port = self._launch()
                _run_coroutine(lambda: _wait_ready_and_create_db(self._port_or_fail(), self._deadline()))
            except BaseException:
                self._shutdown_server()
                self._release_data_dir()
                self._port = None
                raise
            self._url = f"postgresql://{SUPERUSER}@{HOST}:{self._port}/{DATABASE}"
            self._owner_pid = os.getpid()
            if not self._atexit_registered:
                # The server must never outlive the process that started it (SIGKILL aside: the next
                # start() finds and stops such an orphan).
                atexit.register(self._stop_at_exit)
                self._atexit_registered = True
            log.info(
                "embedded PostgreSQL (%s binaries) ready at %s, data in %s",
                self._bins.origin,
                self._url,
                self._data_dir,
            )
            return self._url

    def stop(self) -> None:
        with self._mutex:
            if self._url is None:
                return
            try:
                self._shutdown_server()
            finally:
                self._url = None
                self._port = None
                self._release_data_dir()
                if self._atexit_registered:
                    atexit.unregister(self._stop_at_exit)  # and drop atexit's reference to us
                    self._atexit_registered = False

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- start/stop steps -------------------------------------------------------------------------------

    def _stop_at_exit(self) -> None:
        # A forked child inherits the atexit hook; only the starting process may stop the server.
        if os.getpid() == self._owner_pid:
            self.stop()

    def _prepare_data_dir(self) -> Path:
        path = self._requested_dir.resolve()
        run_as = self._run_as
        if run_as is None:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            return path
        if not _traversable(path, run_as):
            fallback = _fallback_dir(path)
            log.warning(
                "%s is not reachable by OS user %r; using %s for the PostgreSQL data directory",
                path,
                run_as.name,
                fallback,
            )
            path = fallback
        _make_dirs_for(path, run_as)
        return path

    def _claim_data_dir(self) -> None:
        """flock the data directory for our lifetime: a second owner fails fast, and a server still running
        from a data directory nobody holds is known to be an orphan of a killed process."""
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"PostgreSQL data directory {self.data_dir} is in use by another EmbeddedPostgres "
                "(this or another process)"
            ) from None
        self._dir_lock_fd = fd

    def _release_data_dir(self) -> None:
        if self._dir_lock_fd is not None:
            os.close(self._dir_lock_fd)  # closing drops the flock
            self._dir_lock_fd = None

    def _initdb(self) -> None:
        bins = self._bins_or_fail()
        log.info("initialising PostgreSQL data directory %s", self.data_dir)
        # --no-locale: C collation whatever the host's LANG (which may name a locale that is not installed).
        args = [
            bins.initdb,
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ]
        code, output = self._run(args, timeout=max(120.0, self._startup_timeout_s))
        if code != 0:
            raise RuntimeError(f"initdb failed for {self.data_dir} (exit {code}):\n{output}")

    def _stop_leftover_server(self) -> None:
        """Deal with postmaster.pid left by a previous run. We hold the directory lock, so a live server here
        is an orphan of a killed process: stop it. A dead pid is left to PostgreSQL's own stale-lock check."""
        pid_file = self.data_dir / "postmaster.pid"
        pid = _read_pid(pid_file)
        if pid is None or not _pid_alive(pid):
            return
        if _is_postmaster_of(pid, self.data_dir) is False:
            # The pid was reused by an unrelated process (common in containers); PostgreSQL would refuse to
            # start, believing another postmaster runs.
            log.warning("removing stale %s: pid %d is not a postmaster for this directory", pid_file, pid)
            pid_file.unlink(missing_ok=True)
            return
        log.warning("stopping a leftover PostgreSQL server (pid %d) on %s", pid, self.data_dir)
        self._shutdown_server()

    def _launch(self) -> int:
        """pg_ctl start -w; with no fixed port, retry on a port taken between probe and bind."""
        bins = self._bins_or_fail()
        log_path = self.data_dir / LOG_NAME
        attempts = 3 if self._requested_port is None else 1
        for attempt in range(1, attempts + 2):  # +1: a retry for orphan backends still holding shared memory
            port = self._requested_port or _free_port()
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            args = [
                bins.pg_ctl,
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(log_path),
                "-w",
                "-t",
                str(max(1, int(self._startup_timeout_s))),
                "-o",
                self._server_options(port),
            ]
            code, output = self._run(args, timeout=self._startup_timeout_s + 30)
            if code == 0:
                return port
            tail = _read_from(log_path, log_offset)
            self._shutdown_server()  # pg_ctl -w may time out while the server is still coming up
            port_taken = "could not bind" in tail or "Address already in use" in tail
            shm_busy = "pre-existing shared memory block" in tail
            if attempt < attempts + 1 and ((port_taken and self._requested_port is None) or shm_busy):
                log.info(
                    "PostgreSQL start attempt %d failed (%s); retrying",
                    attempt,
                    "port taken" if port_taken else "old backends still exiting",
                )
                time.sleep(0.5 * attempt)
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start on {HOST}:{port} from {self.data_dir} "
                f"(pg_ctl exit {code}):\n{output.strip()}\n--- {log_path} ---\n{tail}"
            )
        raise AssertionError("unreachable")

    def _server_options(self, port: int) -> str:
        socket_dir = str(self.data_dir)
        if len(f"{socket_dir}/.s.PGSQL.{port}") > _SUN_PATH_MAX:
            # Too long for a unix socket path; the DSN uses TCP anyway, so go without one.
            socket_dir = ""
        settings = {
            **SETTINGS,
            "listen_addresses": HOST,
            "port": str(port),
            # Our own socket directory, so we never clash with (or connect to) a system server in /var/run.
            "unix_socket_directories": socket_dir,
        }
        # pg_ctl hands -o to /bin/sh, hence the quoting.
        return " ".join(f"-c {shlex.quote(f'{key}={value}')}" for key, value in settings.items())

    def _shutdown_server(self) -> None:
        """pg_ctl stop -m fast (clean checkpoint), then -m immediate if that does not finish."""
        if self._bins is None or self._data_dir is None or not (self.data_dir / "postmaster.pid").exists():
            return
        for mode in ("fast", "immediate"):
            args = [self._bins.pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60"]
            code, output = self._run(args, timeout=90)
            if code == 0 or not self._server_running():
                return
            log.warning("pg_ctl stop -m %s failed for %s: %s", mode, self.data_dir, output.strip())
        log.error("could not stop PostgreSQL on %s; see %s", self.data_dir, self.data_dir / LOG_NAME)

    def _server_running(self) -> bool:
        code, _ = self._run([self._bins_or_fail().pg_ctl, "status", "-D", str(self.data_dir)], timeout=30)
        return code == 0

    # -- helpers ----------------------------------------------------------------------------------------

    def _run(self, args: list[str], timeout: float) -> tuple[int, str]:
        """Run a PostgreSQL tool, as the unprivileged server user when we are root."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGDATA/PGPORT surprises
        user_kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            # subprocess drops privileges in the child itself (no preexec_fn), which is thread-safe.
            user_kwargs = {
                "user": self._run_as.uid,
                "group": self._run_as.gid,
                "extra_groups": list(self._run_as.groups),
            }
            env.update(HOME=self._run_as.home, USER=self._run_as.name, LOGNAME=self._run_as.name)
        # A file, not a pipe: the server forked by pg_ctl must not keep our pipe open (pgserver saw hangs).
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.data_dir,
                    timeout=timeout,
                    check=False,
                    **user_kwargs,
                )
                code = result.returncode
            except subprocess.TimeoutExpired:
                code = -1
            out.seek(0)
            return code, out.read()

    def _deadline(self) -> float:
        return time.monotonic() + self._startup_timeout_s

    def _port_or_fail(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres has no port")
        return self._port

    def _bins_or_fail(self) -> _Binaries:
        if self._bins is None:
            raise RuntimeError("EmbeddedPostgres binaries not resolved")
        return self._bins


def resolve_database_url(data_dir: str | os.PathLike[str]) -> tuple[str, EmbeddedPostgres | None]:
    """RAYLOOP_DATABASE_URL if set (returned as is, with None), else start an EmbeddedPostgres there."""
    url = os.environ.get("RAYLOOP_DATABASE_URL")
    if url:
        return url, None
    server = EmbeddedPostgres(data_dir)
    return server.start(), server


# -- module helpers ---------------------------------------------------------------------------------------


def _find_binaries() -> _Binaries:
    on_path = {name: shutil.which(name) for name in ("initdb", "pg_ctl", "postgres")}
    if all(on_path.values()):
        # Resolve symlinks (/usr/local/bin -> /usr/lib/postgresql/N/bin): pg_ctl finds postgres beside itself.
        return _Binaries(
            initdb=str(Path(on_path["initdb"] or "").resolve()),
            pg_ctl=str(Path(on_path["pg_ctl"] or "").resolve()),
            origin="PATH",
        )
    # Locate pgserver's bundled binaries without importing it (its import sets up locks and runtime dirs).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists():
            return _Binaries(
                initdb=str(bin_dir / "initdb"), pg_ctl=str(bin_dir / "pg_ctl"), origin="pgserver"
            )
    raise RuntimeError(
        "no PostgreSQL binaries: put initdb/pg_ctl/postgres on PATH, install the pgserver "
        "package, or set RAYLOOP_DATABASE_URL to an existing server"
    )


def _run_as_user() -> _RunAs | None:
    """None unless we are root; then the postgres system user (created, as pgserver does, if absent)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "rayloop-pg"):
        with contextlib.suppress(KeyError):
            return _as_run_user(pwd.getpwnam(name))
    log.warning("running as root and no 'postgres' OS user exists; creating system user 'rayloop-pg'")
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "rayloop-pg"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            "PostgreSQL cannot run as root and no 'postgres' OS user exists (useradd failed: "
            f"{exc}); create one or set RAYLOOP_DATABASE_URL"
        ) from exc
    return _as_run_user(pwd.getpwnam("rayloop-pg"))


def _as_run_user(entry: pwd.struct_passwd) -> _RunAs:
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")


def _can_search(path: Path, run_as: _RunAs) -> bool:
    st = path.stat()
    if st.st_uid == run_as.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in run_as.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _traversable(path: Path, run_as: _RunAs) -> bool:
    """Whether run_as can reach path: search permission on every existing ancestor."""
    return all(_can_search(parent, run_as) for parent in path.parents if parent.exists())


def _require_traversable(path: Path, run_as: _RunAs, what: str) -> None:
    if not (_traversable(path, run_as) and _can_search(path, run_as)):
        raise RuntimeError(
            f"{what} in {path} are not reachable by OS user {run_as.name!r}; make the "
            "directories world-searchable, install PostgreSQL system-wide, or set RAYLOOP_DATABASE_URL"
        )


def _fallback_dir(path: Path) -> Path:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    # /tmp itself, not TMPDIR: TMPDIR may well be under the same unreachable home directory.
    return Path("/tmp") / f"rayloop-pg-{os.getuid()}-{digest}"


def _make_dirs_for(path: Path, run_as: _RunAs) -> None:
    """Create path (and missing parents, world-searchable) and hand path itself to run_as."""
    for parent in reversed(path.parents):
        if not parent.exists():
            with contextlib.suppress(FileExistsError):
                parent.mkdir()
                parent.chmod(0o755)  # explicit: root's umask may be 077
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"PostgreSQL data directory {path} is not a directory")
    if st.st_uid not in (0, run_as.uid):
        # Under /tmp a name can be planted by anyone; never adopt another user's directory.
        raise RuntimeError(
            f"PostgreSQL data directory {path} belongs to uid {st.st_uid}, not {run_as.name!r}"
        )
    if st.st_uid != run_as.uid:
        os.chown(path, run_as.uid, run_as.gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _read_pid(pid_file: Path) -> int | None:
    try:
        first = pid_file.read_text().splitlines()[0]
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _is_postmaster_of(pid: int, data_dir: Path) -> bool | None:
    """From /proc: is pid a postgres server started on data_dir? None where /proc can't tell (not Linux)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None if not Path("/proc/self").exists() else False
    except OSError:
        return None
    return Path(os.fsdecode(argv[0])).name in ("postgres", "postmaster") and os.fsencode(data_dir) in argv


def _read_from(path: Path, offset: int, limit: int = 6000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError as exc:
        return f"(no server log: {exc})"
    return text[-limit:]


def _run_coroutine(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion from sync code, even when the caller is itself inside an event loop."""

    async def main() -> _T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def _wait_ready_and_create_db(port: int, deadline: float) -> None:
    """Connect until the server accepts us (pg_ctl -w only watches postmaster.pid), then create the db."""
    while True:
        try:
            connection = await asyncpg.connect(
                host=HOST,
                port=port,
                user=SUPERUSER,
                database="postgres",
                timeout=max(1.0, deadline - time.monotonic()),
            )
            break
        except (OSError, asyncpg.CannotConnectNowError) as exc:  # TimeoutError is an OSError
            if time.monotonic() >= deadline:
                raise RuntimeError(f"PostgreSQL on {HOST}:{port} did not accept connections: {exc}") from exc
            await asyncio.sleep(0.2)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await connection.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await connection.close()
