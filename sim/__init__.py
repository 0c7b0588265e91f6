"""DFSP simulator: one HTTP server playing any number of FSPIOP v1.1 DFSPs against a hub.

Tests, benchmarks and people following the README share it::

    sim = Simulator("http://127.0.0.1:3000")
    sim.add_dfsp("payerfsp")
    sim.add_dfsp("payeefsp", Behaviour(mode="reserve"))
    await sim.start()
    status, _, prepare = await sim.send_prepare("payerfsp", "payeefsp", "10", "USD")
    put = await sim.wait_for("payerfsp", lambda r: r.method == "PUT", 5)

or from a shell: ``python -m sim.simulator --hub http://127.0.0.1:3000 --port 4000 --dfsp payerfsp
--dfsp payeefsp:reserve``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.simulator import MODES, Behaviour, Counters, Dfsp, Received, Simulator

__all__ = ["MODES", "Behaviour", "Counters", "Dfsp", "Received", "Simulator"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m sim.simulator`` does not import the module twice (runpy warns).
    if name in __all__:
        from sim import simulator

        return getattr(simulator, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
