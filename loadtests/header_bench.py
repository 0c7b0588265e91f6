"""What the FSPIOP header check costs per transfer: values seen before against values never seen.

Every transfer brings two requests through ``HeaderChecker.check`` on the ingress worker's event loop
(the payer's POST and the payee's PUT). DFSPs send the same Accept and Content-Type on every request and
the same Date for a whole second, so the checker remembers each value it has parsed. This times a POST
and a PUT with the values already remembered (the steady state) and with both caches emptied before each
request (what every request cost before the caches, plus filling them), in alternating rounds, and
reports the best round of each in microseconds of CPU per transfer.

    python -m loadtests.header_bench --transfers 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import time

from api.fspiop.headers import HeaderChecker, parse_date
from api.fspiop.routes import resolve

_MEDIA = "application/vnd.interoperability.transfers+json;version=1.1"
_PREPARE_HEADERS = {"date": "Tue, 25 Nov 2026 08:12:31 GMT", "fspiop-source": "payer0",
                    "fspiop-destination": "payee0", "accept": _MEDIA, "content-type": _MEDIA}
_FULFIL_HEADERS = {k: v for k, v in _PREPARE_HEADERS.items() if k != "accept"} | {
    "fspiop-source": "payee0", "fspiop-destination": "payer0"}


def _forget(checker: HeaderChecker) -> None:
    checker.cache_clear()
    parse_date.cache_clear()


def _us_per_transfer(transfers: int, *, remembered: bool) -> float:
    prepare, fulfil = resolve("POST", "/transfers"), resolve("PUT", "/transfers/0f0e0d0c")
    checker = HeaderChecker()
    started = time.process_time()
    for _ in range(transfers):
        if not remembered:
            _forget(checker)
        checker.check(prepare, _PREPARE_HEADERS)
        if not remembered:
            _forget(checker)
        checker.check(fulfil, _FULFIL_HEADERS)
    return (time.process_time() - started) / transfers * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=100_000, help="transfers (POST + PUT) per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each; the best is reported")
    args = parser.parse_args(argv)
    remembered, fresh = [], []
    for _ in range(args.rounds):
        remembered.append(_us_per_transfer(args.transfers, remembered=True))
        fresh.append(_us_per_transfer(args.transfers, remembered=False))
    print("| header values | us of CPU per transfer (POST + PUT), best round |\n|---|---:|")
    print(f"| remembered (steady state) | {min(remembered):.2f} |")
    print(f"| never seen (caches emptied each time) | {min(fresh):.2f} |")


if __name__ == "__main__":
    main()
