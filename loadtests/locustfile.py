"""Locust against a running hub: DFSP payers whose transfers complete when the hub's callback arrives.

    rayloop up &
    python -m loadtests.setup_hub &                  # onboards, writes .rayloop/locust-env.json, plays the payees
    locust -f loadtests/locustfile.py                # web UI on http://127.0.0.1:8089
    locust -f loadtests/locustfile.py --headless -u 64 -r 16 -t 60s --processes 2

Each Locust process is one payer DFSP: on its first user it binds the callback port of the first payer in
the env file whose port is free (payer i's endpoints point at ``receiver_port + i``), so with
``--processes N`` every process gets a payer of its own and the callbacks for a transfer reach the process
that sent it. The receiver is gevent's WSGI server (Locust runs on gevent; no thread, no asyncio loop).

Reported to Locust (request type ``FSPIOP``):

- ``transfer`` (``TransferUser``): POST /transfers to the payer's ``PUT /transfers/{ID}`` COMMITTED
  callback, end to end. A refusal, an error callback, another state or no callback within
  ``--callback-timeout-s`` is a failure with its reason.
- ``ThreeLegUser``, enabled when ``setup_hub`` found the hub serving parties and quotes (``three_leg`` in the
  env file): ``lookup`` (GET /parties without FSPIOP-Destination, the hub asks its oracle, to the PUT
  /parties callback), ``quote`` (POST /quotes to the payee named by the lookup, to PUT /quotes/{ID}),
  ``transfer (3-leg)`` (POST /transfers with the quote's ILP packet and condition), and ``3-leg flow``, the
  three end to end.

Options: ``--callback-timeout-s`` (default 30), ``--transfers-per-user-per-s`` (0: each user sends the next
transfer as soon as the last completes; > 0: paced, so ``-u 400 --transfers-per-user-per-s 1`` offers 400
transfers/s). The env file is ``RAYLOOP_LOCUST_ENV`` (default ``.rayloop/locust-env.json``); ``--host``
defaults to the hub URL in it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path

import gevent
import orjson
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.pywsgi import WSGIServer
from geventhttpclient import HTTPClient
from geventhttpclient.url import URL
from locust import User, constant_throughput, events, task

from sim.simulator import Simulator

ENV_FILE = Path(os.environ.get("RAYLOOP_LOCUST_ENV", ".rayloop/locust-env.json"))
ENV: dict = json.loads(ENV_FILE.read_text()) if ENV_FILE.exists() else {}


class FlowFailed(Exception):
    """A flow that did not end as a payer expects; the message says where and why."""


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--callback-timeout-s", type=float, default=30.0, help="a callback later than this fails")
    parser.add_argument("--transfers-per-user-per-s", type=float, default=0.0,
                        help="0: closed loop; > 0: each user paced to this many flows a second")


@events.test_start.add_listener
def _check_env(environment, **_kwargs) -> None:
    if not ENV:
        raise SystemExit(f"{ENV_FILE} not found: run `python -m loadtests.setup_hub` first (or set RAYLOOP_LOCUST_ENV)")


# ------------------------------------------------------------------------------------- callback receiver


class CallbackReceiver:
    """The hub's callbacks to this process's payer: each waiting flow gets the one it expects.

    Keys are the path after the payer prefix without ``/error`` (``transfers/{ID}``, ``quotes/{ID}``,
    ``parties/MSISDN/{ID}``); several users of one process may look up the same party, so waiters for a
    key queue in order."""

    def __init__(self, payer: dict):
        self.payer = payer["name"]
        self.waiting: dict[str, deque[AsyncResult]] = {}
        self.unexpected = 0
        self.server = WSGIServer((payer["receiver_host"], payer["receiver_port"]), self._app, log=None)
        self.server.start()  # binds now: OSError when another process has this payer's port

    def expect(self, key: str) -> AsyncResult:
        result = AsyncResult()
        self.waiting.setdefault(key, deque()).append(result)
        return result

    def forget(self, key: str, result: AsyncResult) -> None:
        queue = self.waiting.get(key)
        if queue is not None:
            try:
                queue.remove(result)
            except ValueError:
                pass
            if not queue:
                del self.waiting[key]

    def _app(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        prefix, _, rest = environ["PATH_INFO"].lstrip("/").partition("/")
        is_error = rest.endswith("/error")
        key = rest[: -len("/error")] if is_error else rest
        queue = self.waiting.get(key) if prefix == self.payer and method == "PUT" else None
        if queue:
            result = queue.popleft()
            if not queue:
                del self.waiting[key]
            try:
                parsed = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                parsed = {"unparsable": body[:200].decode(errors="replace")}
            result.set((is_error, parsed))
        else:
            self.unexpected += 1  # a late callback after its flow timed out, or a PATCH: answered all the same
        start_response("202 Accepted" if method in ("GET", "POST", "DELETE") else "200 OK", [("Content-Length", "0")])
        return [b""]


_claim_lock = Semaphore()
_receiver: CallbackReceiver | None = None


def receiver() -> CallbackReceiver:
    """This process's receiver, for the first payer whose port is free (see the module docstring)."""
    global _receiver
    with _claim_lock:
        if _receiver is None:
            for payer in ENV["payers"]:
                try:
                    _receiver = CallbackReceiver(payer)
                    break
                except OSError:
                    continue
            else:
                raise SystemExit(f"every payer's callback port is taken: run setup_hub with more --payers "
                                 f"than Locust processes ({len(ENV['payers'])} now)")
        return _receiver


# ------------------------------------------------------------------------------------------ the users


def _headers(resource: str, source: str, destination: str | None, *, accept: bool) -> dict[str, str]:
    media = f"application/vnd.interoperability.{resource}+json;version=1.1"
    headers = {"Content-Type": media, "Date": formatdate(usegmt=True), "FSPIOP-Source": source}
    if accept:
        headers["Accept"] = media
    if destination is not None:
        headers["FSPIOP-Destination"] = destination
    return headers


def _iso_in(seconds: float) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Payer(User):
    """Common to both flows: the process's payer, an HTTP client to the hub, and reporting."""

    abstract = True
    host = ENV.get("hub_url")
    _client: HTTPClient | None = None
    _client_lock = Semaphore()

    def on_start(self) -> None:
        self.receiver = receiver()
        self.payer = self.receiver.payer
        options = self.environment.parsed_options
        self.callback_timeout_s = getattr(options, "callback_timeout_s", 30.0)
        rate = getattr(options, "transfers_per_user_per_s", 0.0)
        self._pace = constant_throughput(rate) if rate > 0 else None
        self.payees = itertools.cycle(ENV["payees"])
        self.currency = ENV["currency"]
        self.amount = ENV["amount"]

    def wait_time(self) -> float:
        return self._pace(self) if self._pace is not None else 0.0

    def client(self) -> HTTPClient:
        with _Payer._client_lock:
            if _Payer._client is None:
                # One pool per process, sized for every user of it; the hub's 202 comes at once.
                _Payer._client = HTTPClient.from_url(URL(self.host), concurrency=max(16, self.environment.runner
                                                     .target_user_count or 16), connection_timeout=10,
                                                     network_timeout=30)
            return _Payer._client

    def send(self, method: str, path: str, body: dict | None, resource: str, destination: str | None) -> None:
        """One FSPIOP request from the payer; FlowFailed unless the hub accepts it (202)."""
        payload = orjson.dumps(body) if body is not None else b""
        headers = _headers(resource, self.payer, destination, accept=method in ("GET", "POST", "DELETE"))
        response = self.client().request(method, path, body=payload, headers=headers)
        answer = response.read()
        if response.status_code != 202:
            raise FlowFailed(f"{method} {path.split('/')[1]} answered {response.status_code}: {answer[:200]!r}")

    def await_callback(self, key: str, waiter: AsyncResult, what: str) -> dict:
        try:
            is_error, body = waiter.get(timeout=self.callback_timeout_s)
        except gevent.Timeout:
            raise FlowFailed(f"{what}: no callback within {self.callback_timeout_s} s") from None
        finally:
            self.receiver.forget(key, waiter)
        if is_error:
            info = body.get("errorInformation", {})
            raise FlowFailed(f"{what}: error {info.get('errorCode')} {info.get('errorDescription')}")
        return body

    def report(self, name: str, started: float, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="FSPIOP", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={"payer": self.payer})

    def transfer(self, body: dict, payee: str, what: str) -> None:
        key = f"transfers/{body['transferId']}"
        waiter = self.receiver.expect(key)
        try:
            self.send("POST", "/transfers", body, "transfers", payee)
        except Exception:
            self.receiver.forget(key, waiter)
            raise
        state = self.await_callback(key, waiter, what).get("transferState")
        if state != "COMMITTED":
            raise FlowFailed(f"{what}: transferState {state}")


class TransferUser(_Payer):
    """A payer that sends transfers with an agreed condition (the payee's secret, as after a quote)."""

    _builder: Simulator | None = None

    def on_start(self) -> None:
        super().on_start()
        if TransferUser._builder is None:
            builder = Simulator(self.host, record=False)  # never started: it only builds prepares
            for payee in ENV["payees"]:
                builder.add_dfsp(payee["name"], secret=bytes.fromhex(payee["secret_hex"]))
            TransferUser._builder = builder

    @task
    def send_transfer(self) -> None:
        payee = next(self.payees)["name"]
        body = TransferUser._builder.prepare_body(self.payer, payee, self.amount, self.currency)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.transfer(body, payee, "transfer")
        except Exception as failure:  # every failure is reported, never raised into Locust's runner
            error = failure
        self.report("transfer", started, error)


class ThreeLegUser(_Payer):
    """Lookup, quote, transfer: as a payer DFSP does for a P2P payment (RULES.md 4, 8 and 9)."""

    abstract = not ENV.get("three_leg", False)

    @task
    def pay_a_party(self) -> None:
        payee = next(self.payees)
        party = random.choice(payee["parties"])
        flow_started = time.perf_counter()
        error: Exception | None = None
        step, step_started = "lookup", flow_started
        try:
            key = f"parties/MSISDN/{party}"
            waiter = self.receiver.expect(key)
            try:
                self.send("GET", f"/parties/MSISDN/{party}", None, "parties", None)
            except Exception:
                self.receiver.forget(key, waiter)
                raise
            found = self.await_callback(key, waiter, "lookup").get("party", {}).get("partyIdInfo", {})
            payee_fsp = found.get("fspId")
            if not payee_fsp:
                raise FlowFailed(f"lookup: no fspId in {found}")
            self.report("lookup", step_started, None)

            step, step_started = "quote", time.perf_counter()
            quote_id, transaction_id = str(uuid.uuid4()), str(uuid.uuid4())
            quote = {
                "quoteId": quote_id, "transactionId": transaction_id,
                "payee": {"partyIdInfo": found},
                "payer": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "27111000000",
                                          "fspId": self.payer}},
                "amountType": "SEND", "amount": {"amount": self.amount, "currency": self.currency},
                "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
            }
            key = f"quotes/{quote_id}"
            waiter = self.receiver.expect(key)
            try:
                self.send("POST", "/quotes", quote, "quotes", payee_fsp)
            except Exception:
                self.receiver.forget(key, waiter)
                raise
            terms = self.await_callback(key, waiter, "quote")
            missing = [name for name in ("transferAmount", "ilpPacket", "condition") if name not in terms]
            if missing:
                raise FlowFailed(f"quote: PUT /quotes without {', '.join(missing)}")
            self.report("quote", step_started, None)

            step, step_started = "transfer (3-leg)", time.perf_counter()
            # The transfer carries the quote's transactionId as its id, and the payee's ILP packet and condition.
            prepare = {
                "transferId": transaction_id, "payerFsp": self.payer, "payeeFsp": payee_fsp,
                "amount": terms["transferAmount"], "ilpPacket": terms["ilpPacket"], "condition": terms["condition"],
                "expiration": _iso_in(30),
            }
            self.transfer(prepare, payee_fsp, "transfer (3-leg)")
            self.report("transfer (3-leg)", step_started, None)
        except Exception as failure:  # reported against the step that failed and the flow
            error = failure
            self.report(step, step_started, error)
        self.report("3-leg flow", flow_started, error)
