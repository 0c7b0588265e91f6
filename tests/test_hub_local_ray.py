"""A hub that starts its own Ray (no RAYLOOP_RAY_ADDRESS, no Ray running): on loopback, its actors at
the configured niceness, and Ray gone after stop."""

from __future__ import annotations

import psutil
import pytest
import ray
import uvloop

from cluster.config import HubConfig
from cluster.testing import running_hub


def _ingress_worker_niceness() -> list[int]:
    return [
        process.nice()
        for process in psutil.Process().children(recursive=True)
        if process.name().startswith("ray::IngressWor")  # the kernel keeps 15 characters of the name
    ]


@pytest.mark.parametrize("niceness", [0, 7])
def test_a_hub_starts_its_private_ray_on_loopback_and_ends_it(database_url, niceness):
    assert not ray.is_initialized()  # other modules end their Ray; this one must start its own

    async def scenario():
        async with running_hub(database_url, ray_worker_niceness=niceness) as hub:
            assert hub._started_ray
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
            # Ray's default would be 15: the hub's data path behind everything else on the machine.
            assert _ingress_worker_niceness() == [niceness]

    uvloop.run(scenario())
    assert not ray.is_initialized()


@pytest.mark.parametrize("value", ["-1", "20"])
def test_a_worker_niceness_outside_0_to_19_is_refused(monkeypatch, value):
    monkeypatch.setenv("RAYLOOP_RAY_WORKER_NICENESS", value)
    with pytest.raises(ValueError, match="RAYLOOP_RAY_WORKER_NICENESS"):
        HubConfig.from_env()
