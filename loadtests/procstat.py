"""CPU and memory per component of a benchmark, read from /proc (Linux only).

The machine is shared (other hubs, other Rays, other databases on the same Postgres server), so a
component is found by ancestry and by database name, never by process name alone: everything this
benchmark started descends from the driver process (Ray's gcs_server and raylet, its workers, the
simulator and forwarder subprocesses, an embedded Postgres), and a shared Postgres server's backends
name their database in their process title (``postgres: user dbname 127.0.0.1(port) idle``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class _Proc:
    pid: int
    ppid: int
    cpu_s: float
    rss_bytes: int
    cmdline: str


def _read_all() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        # The command name in parentheses may contain spaces; the fields after it are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        procs[int(entry)] = _Proc(
            pid=int(entry),
            ppid=int(fields[1]),
            cpu_s=(int(fields[11]) + int(fields[12])) / _TICKS_PER_S,
            rss_bytes=int(statm.split()[1]) * _PAGE_BYTES,
            cmdline=cmdline.strip(),
        )
    return procs


@dataclass
class ComponentMap:
    """How to name this benchmark's processes: explicit pids first, then descendants of ``root_pid`` by
    their Ray actor class, then Postgres backends of ``database``."""

    root_pid: int = field(default_factory=os.getpid)
    named_pids: dict[int, str] = field(default_factory=dict)  # e.g. simulator and forwarder subprocesses
    database: str | None = None  # backends of this database on a shared server count as "postgres"

    def classify(self, procs: dict[int, _Proc]) -> dict[int, str]:
        children: dict[int, list[int]] = {}
        for proc in procs.values():
            children.setdefault(proc.ppid, []).append(proc.pid)
        names: dict[int, str] = {}
        # Walk down from the root; a named subprocess's own children inherit its name.
        stack = [(self.root_pid, "driver")]
        while stack:
            pid, inherited = stack.pop()
            proc = procs.get(pid)
            if proc is None:
                continue
            name = self.named_pids.get(pid) or _by_cmdline(proc.cmdline, inherited, pid == self.root_pid)
            names[pid] = name
            stack.extend((child, name if name in self.named_pids.values() else "") for child in children.get(pid, ()))
        if self.database:
            marker = f" {self.database} "
            for proc in procs.values():
                if proc.pid not in names and proc.cmdline.startswith("postgres:") and marker in f"{proc.cmdline} ":
                    names[proc.pid] = "postgres"
        return {pid: name for pid, name in names.items() if name}


def _by_cmdline(cmdline: str, inherited: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    if inherited:
        return inherited
    if "IngressWorker" in cmdline or "api.fspiop.callback_sender" in cmdline:
        return "ingress"  # the worker, and its callback sender process when RAYLOOP_CALLBACK_PROCESS is on
    if "PositionShard" in cmdline:
        return "shards"
    if cmdline.startswith("postgres") or "/postgres " in f"{cmdline.split(' ')[0]} ":
        return "postgres"
    # gcs_server, raylet, idle workers, the log monitor, the dashboard agent: Ray's own cost.
    return "ray-overhead"


class Sampler:
    """Per-component CPU seconds (cumulative, including processes that ended) and RSS, sampled on demand."""

    def __init__(self, components: ComponentMap):
        self.components = components
        self._last_cpu: dict[int, tuple[str, float]] = {}
        self._ended_cpu: dict[str, float] = {}

    def sample(self) -> tuple[dict[str, float], dict[str, int]]:
        """(CPU seconds so far per component, RSS bytes now per component)."""
        procs = _read_all()
        names = self.components.classify(procs)
        for pid, (name, cpu) in list(self._last_cpu.items()):
            if pid not in procs or names.get(pid) != name:
                # Gone (a Postgres backend that exited, a restarted worker): keep what it had used.
                self._ended_cpu[name] = self._ended_cpu.get(name, 0.0) + cpu
                del self._last_cpu[pid]
        cpu_s = dict(self._ended_cpu)
        rss_bytes: dict[str, int] = {}
        for pid, name in names.items():
            proc = procs[pid]
            self._last_cpu[pid] = (name, proc.cpu_s)
            cpu_s[name] = cpu_s.get(name, 0.0) + proc.cpu_s
            rss_bytes[name] = rss_bytes.get(name, 0) + proc.rss_bytes
        return cpu_s, rss_bytes
