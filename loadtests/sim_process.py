"""The DFSP simulator (``sim.simulator.Simulator``) as payees in a process of its own, with given secrets.

Why not ``python -m sim.simulator``: a payer builds a prepare's condition from the payee's secret (the
quote would carry it in a 3-leg flow), and that CLI draws its secrets at random. Here the parent passes
them in, so its own driver can build prepares locally, and the simulator's CPU is measured apart from
the driver's.

    python -m loadtests.sim_process --hub http://127.0.0.1:3000 --dfsp payee0:<64 hex digits> ...

Prints one JSON line ``{"port": N}`` once it listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import uvloop

from sim.simulator import Simulator

REPO_ROOT = Path(__file__).resolve().parent.parent


async def _serve(args: argparse.Namespace) -> None:
    simulator = Simulator(args.hub, port=args.port, record=False, max_connections=args.max_connections)
    for spec in args.dfsp:
        name, _, secret_hex = spec.partition(":")
        simulator.add_dfsp(name, secret=bytes.fromhex(secret_hex) if secret_hex else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    port = await simulator.start()
    print(json.dumps({"port": port}), flush=True)
    try:
        await stop.wait()
    finally:
        counters = simulator.counters()
        await simulator.stop()
        print(json.dumps({"prepares": counters.prepares, "answered": counters.prepares_answered,
                          "callback_failures": counters.callback_failures}), flush=True)


@dataclass
class PayeeProcess:
    """A running ``sim_process`` child: its pid (for CPU accounting) and the port it listens on."""

    process: subprocess.Popen
    port: int

    @classmethod
    def start(cls, hub_url: str, secrets: dict[str, bytes], *, max_connections: int = 256,
              start_timeout_s: float = 30.0) -> PayeeProcess:
        command = [sys.executable, "-m", "loadtests.sim_process", "--hub", hub_url,
                   "--max-connections", str(max_connections)]
        for name, secret in secrets.items():
            command += ["--dfsp", f"{name}:{secret.hex()}"]
        # From the repository root, where ``loadtests`` is importable whatever the caller's directory.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        line = _readline(process, start_timeout_s)
        if not line:
            process.kill()
            raise RuntimeError(f"simulator process did not start (exit {process.wait()})")
        return cls(process, json.loads(line)["port"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def base_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self, timeout_s: float = 10.0) -> dict:
        """Stop it; returns its final counters (empty if it had to be killed)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return {}
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def _readline(process: subprocess.Popen, timeout_s: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent for ``timeout_s``."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.sim_process", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", required=True, help="FSPIOP base URL the payees call back")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dfsp", action="append", required=True, metavar="NAME[:SECRET_HEX]")
    parser.add_argument("--max-connections", type=int, default=256, help="outbound connections to the hub")
    uvloop.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
