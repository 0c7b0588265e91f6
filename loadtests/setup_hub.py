"""Make a running hub ready for Locust, then play the payee DFSPs until Ctrl-C.

    rayloop up &                                  # the hub: FSPIOP on :3000, admin on :3001
    python -m loadtests.setup_hub --payers 4      # onboard, then serve as the payees (leave it running)
    locust -f loadtests/locustfile.py             # web UI on :8089; or --headless -u 64 -r 16 -t 60s

What it does, in Mojaloop's onboarding order, through the admin API: the hub's accounts for the
currency; each DFSP (``payer0..``, ``payee0..``) with its net debit cap and a deposit of the same size;
callback endpoints: each payer's at ``http://{receiver-host}:{receiver-port + i}/{payer}`` (the callback
receiver inside the Locust process that drives that payer), each payee's at this process. Names that
exist already keep their positions and funds (only the endpoints are registered again), so it can be run
again against the same hub.

Then it starts the DFSP simulator (``sim.simulator.Simulator``) as every payee, on ``--sim-port``: it
fulfils each prepare at once. Its secrets, the names and ports go into ``--env-file`` (default
``.rayloop/locust-env.json``), which ``loadtests/locustfile.py`` reads: a payer builds a prepare's
condition from the payee's secret, as if a quote had been agreed.

For the 3-leg flow (lookup, quote, transfer), each payee's parties are registered with the hub's
account lookup (``POST /participants/MSISDN/{ID}`` as the payee) and given to the simulator; the env
file says whether the hub served that (``three_leg``), and Locust enables its 3-leg user only then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import uvloop

from api.http import ClientPool
from sim.simulator import Simulator

DEFAULT_ENV_FILE = Path(".rayloop/locust-env.json")


def fspiop_endpoints(base_url: str) -> dict[str, str]:
    """Every callback endpoint an FSPIOP DFSP at ``base_url`` needs for lookups, quotes and transfers
    (templates as RULES.md 14 gives them; quotes take a base URL)."""
    party = f"{base_url}/parties/{{{{partyIdType}}}}/{{{{partyIdentifier}}}}"
    party_sub = f"{party}/{{{{partySubIdOrType}}}}"
    participant = f"{base_url}/participants/{{{{partyIdType}}}}/{{{{partyIdentifier}}}}"
    return {
        "FSPIOP_CALLBACK_URL_TRANSFER_POST": f"{base_url}/transfers",
        "FSPIOP_CALLBACK_URL_TRANSFER_PUT": f"{base_url}/transfers/{{{{transferId}}}}",
        "FSPIOP_CALLBACK_URL_TRANSFER_ERROR": f"{base_url}/transfers/{{{{transferId}}}}/error",
        "FSPIOP_CALLBACK_URL_PARTIES_GET": party,
        "FSPIOP_CALLBACK_URL_PARTIES_PUT": party,
        "FSPIOP_CALLBACK_URL_PARTIES_PUT_ERROR": f"{party}/error",
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_GET": party_sub,
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT": party_sub,
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT_ERROR": f"{party_sub}/error",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT": participant,
        "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT_ERROR": f"{participant}/error",
        "FSPIOP_CALLBACK_URL_QUOTES": base_url,
    }


def party_identifiers(payee_index: int, count: int) -> list[str]:
    """MSISDNs held by payee ``payee_index``: distinct across payees, valid PartyIdentifiers."""
    return [f"27{payee_index:03d}{k:06d}" for k in range(count)]


class Admin:
    """The hub's admin API (JSON in, JSON out); amounts are strings, never floats."""

    def __init__(self, pool: ClientPool, base_url: str):
        self.pool = pool
        self.base_url = base_url.rstrip("/")

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        payload = b"" if body is None else orjson.dumps(body)
        headers = [("Content-Type", "application/json")] if body is not None else []
        status, _, raw = await self.pool.request(method, self.base_url + path, headers, payload)
        return status, (json.loads(raw) if raw else None)

    async def expect(self, accepted: tuple[int, ...], method: str, path: str, body: object = None) -> object:
        status, answer = await self.call(method, path, body)
        if status not in accepted:
            raise SystemExit(f"{method} {path}: {status} {answer}")
        return answer


async def onboard(admin: Admin, names: list[str], currency: str, ndc: str) -> list[str]:
    """Hub accounts, then every DFSP not there yet; returns the names that were created now."""
    for account_type in ("HUB_MULTILATERAL_SETTLEMENT", "HUB_RECONCILIATION"):
        # 400 when the hub already has it: this setup may run again against the same hub.
        await admin.expect((201, 400), "POST", "/participants/Hub/accounts",
                           {"type": account_type, "currency": currency})
    created = []
    for name in names:
        status, _ = await admin.call("GET", f"/participants/{name}")
        if status == 200:
            continue
        await admin.expect((201,), "POST", "/participants", {"name": name, "currency": currency})
        await admin.expect((201,), "POST", f"/participants/{name}/initialPositionAndLimits", {
            "currency": currency, "limit": {"type": "NET_DEBIT_CAP", "value": int(ndc)}, "initialPosition": 0})
        accounts = await admin.expect((200,), "GET", f"/participants/{name}/accounts")
        settlement = next(a for a in accounts if a["currency"] == currency and a["ledgerAccountType"] == "SETTLEMENT")
        await admin.expect((202,), "POST", f"/participants/{name}/accounts/{settlement['id']}", {
            "transferId": str(uuid.uuid4()), "externalReference": "loadtests.setup_hub", "action": "recordFundsIn",
            "reason": "load test deposit", "amount": {"amount": ndc, "currency": currency}})
        created.append(name)
    return created


async def register_endpoints(admin: Admin, name: str, endpoints: dict[str, str]) -> None:
    for endpoint_type, value in endpoints.items():
        await admin.expect((201,), "POST", f"/participants/{name}/endpoints", {"type": endpoint_type, "value": value})


def _give_parties(simulator: Simulator, payee: str, identifiers: list[str]) -> bool:
    """Hand the payee's parties to the simulator, where its party registry exists (sim/parties.py)."""
    registry = getattr(simulator.dfsp(payee), "parties", None)
    if registry is None or not hasattr(registry, "add"):
        return False
    from sim.parties import SimParty

    for index, identifier in enumerate(identifiers):
        registry.add(SimParty.named("MSISDN", identifier, f"Load Test Payee{index}"))
    return True


async def _register_parties(simulator: Simulator, payee: str, identifiers: list[str], currency: str) -> bool:
    """The payee tells the hub's account lookup it holds these parties; False when the hub does not serve it."""
    for identifier in identifiers:
        status, answer = await simulator.send("POST", f"/participants/MSISDN/{identifier}",
                                              {"fspId": payee, "currency": currency}, source=payee)
        if status != 202:
            print(f"account lookup not available: POST /participants/MSISDN/{identifier} answered {status} {answer}")
            return False
    return True


async def _quotes_served(simulator: Simulator, payer: str, payee: str, party: str, currency: str) -> bool:
    """Whether the hub serves quotes: a valid POST /quotes is answered 202 (not 501 with 2002).

    The quote really goes to the payee (this simulator), and its answer to the payer's endpoint, which is
    the Locust receiver and may not listen yet: that delivery fails and is only logged by the hub."""
    body = {
        "quoteId": str(uuid.uuid4()), "transactionId": str(uuid.uuid4()),
        "payee": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": party, "fspId": payee}},
        "payer": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "27888000000", "fspId": payer}},
        "amountType": "SEND", "amount": {"amount": "1", "currency": currency},
        "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
    }
    status, answer = await simulator.send("POST", "/quotes", body, source=payer, destination=payee)
    if status != 202:
        print(f"quotes not available: POST /quotes answered {status} {answer}")
    return status == 202


async def main(args: argparse.Namespace) -> None:
    payers = [f"payer{i}" for i in range(args.payers)]
    payees = [f"payee{i}" for i in range(args.payees)]
    simulator = Simulator(args.hub, host=args.sim_host, port=args.sim_port, record=False,
                          max_connections=args.connections, auto_answer=True)
    for payee in payees:
        simulator.add_dfsp(payee)
    pool = ClientPool(request_timeout_s=30.0)
    admin = Admin(pool, args.admin)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await simulator.start()
    try:
        created = await onboard(admin, payers + payees, args.currency, args.ndc)
        print(f"onboarded {len(created)} new DFSPs ({len(payers + payees) - len(created)} already there)")
        for index, payer in enumerate(payers):
            await register_endpoints(admin, payer, fspiop_endpoints(
                f"http://{args.receiver_host}:{args.receiver_port + index}/{payer}"))
        for payee in payees:
            await register_endpoints(admin, payee, fspiop_endpoints(simulator.base_url(payee)))
        parties = {payee: party_identifiers(index, args.parties) for index, payee in enumerate(payees)}
        three_leg = args.parties > 0 and all(_give_parties(simulator, payee, ids) for payee, ids in parties.items())
        if args.parties > 0 and not three_leg:
            print("3-leg flow off: this simulator has no party registry (sim/parties.py not wired in yet)")
        if three_leg:
            for payee, identifiers in parties.items():
                three_leg = three_leg and await _register_parties(simulator, payee, identifiers, args.currency)
            three_leg = three_leg and await _quotes_served(simulator, payers[0], payees[0], parties[payees[0]][0],
                                                           args.currency)
        env = {
            "hub_url": args.hub, "currency": args.currency, "amount": args.amount,
            "payers": [{"name": payer, "receiver_host": args.receiver_host, "receiver_port": args.receiver_port + i}
                       for i, payer in enumerate(payers)],
            "payees": [{"name": payee, "secret_hex": simulator.dfsp(payee).secret.hex(), "parties": parties[payee]}
                       for payee in payees],
            "three_leg": three_leg,
        }
        args.env_file.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed into place: a Locust (or a test) that sees the file never reads half of it.
        partial = args.env_file.with_name(args.env_file.name + ".partial")
        partial.write_text(json.dumps(env, indent=1) + "\n")
        partial.replace(args.env_file)
        print(f"wrote {args.env_file}; 3-leg flow {'on' if three_leg else 'off'}; payees served by the simulator "
              f"on {urlsplit(simulator.base_url(payees[0])).netloc}. Now run Locust (Ctrl-C here stops the payees):\n"
              f"  locust -f loadtests/locustfile.py --host {args.hub}", flush=True)
        await stop.wait()
    finally:
        counters = simulator.counters()
        await simulator.stop()
        await pool.close()
        print(f"payees: {counters.prepares} prepares, {counters.prepares_answered} answered, "
              f"{counters.callback_failures} callbacks failed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.setup_hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", default="http://127.0.0.1:3000", help="the hub's FSPIOP base URL")
    parser.add_argument("--admin", default="http://127.0.0.1:3001", help="the hub's admin API")
    parser.add_argument("--currency", default="XTS")
    parser.add_argument("--amount", default="1", help="each transfer's amount")
    parser.add_argument("--payers", type=int, default=8, help="one per Locust process (--processes), at least")
    parser.add_argument("--payees", type=int, default=4)
    parser.add_argument("--ndc", default="1000000000", help="net debit cap and deposit of each new DFSP")
    parser.add_argument("--parties", type=int, default=100, help="MSISDNs per payee for the 3-leg flow (0: none)")
    parser.add_argument("--receiver-host", default="127.0.0.1", help="where the hub reaches the Locust processes")
    parser.add_argument("--receiver-port", type=int, default=4100, help="payer i's callbacks go to this port + i")
    parser.add_argument("--sim-host", default="127.0.0.1")
    parser.add_argument("--sim-port", type=int, default=4000, help="the payee simulator")
    parser.add_argument("--connections", type=int, default=256, help="the simulator's connections to the hub")
    parser.add_argument("--env-file", type=Path, default=DEFAULT_ENV_FILE)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        uvloop.run(main(args))
    except KeyboardInterrupt:  # a second Ctrl-C
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
