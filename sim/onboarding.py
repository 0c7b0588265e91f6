"""Onboard simulated DFSPs on a hub with every callback endpoint they serve (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable

from cluster.testing import admin, onboard
from sim.parties import SimParty
from sim.simulator import Behaviour, Simulator

__all__ = ["onboard_simulated"]


async def onboard_simulated(hub, sim: Simulator, names: list[str], currency: str, *, ndc: str = "10000",
                            deposit: str = "10000", behaviour: Behaviour | None = None,
                            parties: dict[str, Iterable[SimParty]] | None = None) -> None:
    """Each name: a simulated DFSP (``behaviour``, its ``parties``), a participant with a position, a net
    debit cap and a deposit, and all of ``Simulator.all_endpoints``. ``hub``: a ``cluster.hub.Hub``."""
    for name in names:
        sim.add_dfsp(name, behaviour)
        for party in (parties or {}).get(name, ()):
            sim.add_party(name, party)
    await onboard(hub, names, currency, ndc=ndc, deposit=deposit)
    for name in names:
        for endpoint_type, value in sim.all_endpoints(name).items():
            status, body = await admin(hub, "POST", f"/participants/{name}/endpoints",
                                       {"type": endpoint_type, "value": value})
            if status != 201:
                raise RuntimeError(f"endpoint {endpoint_type} for {name}: {status} {body}")
