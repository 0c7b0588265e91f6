"""A hub that starts its own Ray (no RAYLOOP_RAY_ADDRESS, no Ray running): on loopback, and gone after stop."""

from __future__ import annotations

import ray
import uvloop

from cluster.testing import running_hub


def test_a_hub_starts_its_private_ray_on_loopback_and_ends_it(database_url):
    assert not ray.is_initialized()  # other modules end their Ray; this one must start its own

    async def scenario():
        async with running_hub(database_url) as hub:
            assert hub._started_ray
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}

    uvloop.run(scenario())
    assert not ray.is_initialized()
