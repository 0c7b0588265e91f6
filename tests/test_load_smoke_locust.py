"""The Locust tooling against a real hub, as a user runs it: ``loadtests/setup_hub.py`` onboards and plays the
payees, then ``locust --headless`` runs ``loadtests/locustfile.py`` for a few seconds. It asserts that every
flow Locust reports succeeded (the transfer flow always; the lookup-quote-transfer flow when the hub serves
parties and quotes) and that money is conserved; never a timing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import uvloop

from cluster.testing import assert_conserved, running_hub
from loadtests.null_forwarder import free_port

# Locust is in the `test` extra (and `load`); installed without it there is nothing to run.
# Looked up, not imported: importing Locust monkey-patches this process for gevent.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="Locust is not installed (pip install -e '.[load]')")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUST = Path(sys.executable).with_name("locust")


async def _wait_for_file(path: Path, process: asyncio.subprocess.Process, timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if path.exists():
            return
        if process.returncode is not None:
            raise AssertionError(f"setup_hub exited with {process.returncode}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"setup_hub wrote no {path} within {timeout_s} s")


async def _scenario(database_url: str, env_file: Path) -> tuple[bool, list[dict]]:
    async with running_hub(database_url, shards=2, ingress_workers=1) as hub:
        setup = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.setup_hub", "--hub", f"http://127.0.0.1:{hub.fspiop_port}",
            "--admin", f"http://127.0.0.1:{hub.admin_port}", "--payers", "1", "--payees", "2", "--parties", "3",
            "--sim-port", str(free_port("127.0.0.1")), "--receiver-port", str(free_port("127.0.0.1")),
            "--env-file", str(env_file), cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL)
        try:
            await _wait_for_file(env_file, setup, 60)
            three_leg = json.loads(env_file.read_text())["three_leg"]
            locust = await asyncio.create_subprocess_exec(
                str(LOCUST), "-f", "loadtests/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "4s",
                "--json", "--only-summary", "--loglevel", "WARNING", cwd=REPO_ROOT,
                env={**os.environ, "RAYLOOP_LOCUST_ENV": str(env_file)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(locust.communicate(), 120)
            assert locust.returncode == 0, err.decode()[-2000:]
            stats = json.loads(out)
        finally:
            setup.terminate()
            await setup.wait()
        await asyncio.sleep(1.0)  # transfers Locust left in flight finish or stay reserved: both balance
        await assert_conserved(hub)
    return three_leg, stats


def test_locust_flows_succeed_against_a_real_hub(database_url, tmp_path):
    three_leg, stats = uvloop.run(_scenario(database_url, tmp_path / "locust-env.json"))
    by_name = {entry["name"]: entry for entry in stats}
    expected = ["transfer"] + (["lookup", "quote", "transfer (3-leg)", "3-leg flow"] if three_leg else [])
    for name in expected:
        assert by_name[name]["num_requests"] > 0, (name, by_name.keys())
    assert {name: entry["num_failures"] for name, entry in by_name.items()} == dict.fromkeys(by_name, 0)
    assert set(by_name) == set(expected)
