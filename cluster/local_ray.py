"""A private local Ray that stays on loopback.

Ray 2.60 does not keep ``ray.init(_node_ip_address="127.0.0.1")``: ``resolve_ip_for_localhost`` swaps
a loopback address for the machine's routable one, found by asking the routing table which source
address would reach an outside host, and the GCS, the raylet and every worker then register on that
address and listen on every interface. Ray skips the swap only where its cluster support is off
(``ray_constants.ENABLE_RAY_CLUSTER``, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). So a private Ray is
started with that switch off, in this process (Ray reads the constant when it resolves the address) and
in the environment of the processes it spawns (each reads the variable when it imports Ray). Both
are put back in this process once Ray is up; Ray's own processes keep the variable, which only makes
them resolve to 127.0.0.1, the node's address anyway. A hub that joins a cluster
(``RAYLOOP_RAY_ADDRESS``) never comes here.
"""

from __future__ import annotations

import os

import ray
from ray._private import ray_constants

LOOPBACK = "127.0.0.1"


def init_local_ray(*, worker_niceness: int = 0, **init_options) -> None:
    """``ray.init`` of a new local instance (never one already running here), on loopback only.

    ``worker_niceness``: Ray starts its worker processes (every actor) at niceness 15 unless told
    otherwise, below the Postgres and clients they share cores with; rayloop's actors are its data path.
    """
    init_options["_system_config"] = {**init_options.get("_system_config", {}), "worker_niceness": worker_niceness}
    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_variable = os.environ.get(variable)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, **init_options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_variable is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_variable
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not {LOOPBACK}; this Ray version needs another way")
