"""The oracle pieces on their own: the choice rule, path parameters, /oracles bodies (pure), and the
built-in oracle against a real Postgres, including two FSPs racing for one party."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import uvloop

from api.fspiop.lookup import currency_query, party_key
from api.fspiop.oracle import (
    BuiltinOracle,
    Deleted,
    Oracle,
    PartyKey,
    Registered,
    _Invalid,
    choose_oracle,
    parse_oracle_info,
)
from core.errors import FspiopError


def test_choose_oracle_currency_then_default_then_builtin():
    usd = Oracle(1, "MSISDN", "http://usd", "USD", False)
    default = Oracle(2, "MSISDN", "http://default", None, True)
    email_eur = Oracle(3, "EMAIL", "http://eur", "EUR", False)
    registered = [usd, default, email_eur]
    assert choose_oracle(registered, "MSISDN", "USD") is usd
    assert choose_oracle(registered, "MSISDN", "EUR") is default
    assert choose_oracle(registered, "MSISDN", None) is default
    # EMAIL has no default: only EUR goes to its oracle, everything else to the built-in one (None).
    assert choose_oracle(registered, "EMAIL", "EUR") is email_eur
    assert choose_oracle(registered, "EMAIL", "USD") is None
    assert choose_oracle(registered, "EMAIL", None) is None
    assert choose_oracle([], "IBAN", "USD") is None
    # A default with a currency still serves as the type's default.
    usd_default = Oracle(4, "ALIAS", "builtin", "USD", True)
    assert choose_oracle([usd_default], "ALIAS", "EUR") is usd_default and usd_default.builtin


def test_party_key_and_currency_checks():
    assert party_key({"Type": "MSISDN", "ID": "+255123"}) == PartyKey("MSISDN", "+255123", "")
    assert party_key({"Type": "BUSINESS", "ID": "shop", "SubId": "till"}).party_sub_id == "till"
    assert PartyKey("ALIAS", "a b/ñ", "x").path() == "/participants/ALIAS/a%20b%2F%C3%B1/x"
    for params in ({"Type": "PHONE", "ID": "1"}, {"Type": "MSISDN", "ID": "1" * 129},
                   {"Type": "MSISDN", "ID": "1\x002"}, {"Type": "MSISDN", "ID": "1", "SubId": "s" * 129}):
        with pytest.raises(FspiopError) as refused:
            party_key(params)
        assert refused.value.code == 3101
    assert currency_query({}) is None and currency_query({"currency": "USD"}) == "USD"
    with pytest.raises(FspiopError):
        currency_query({"currency": "usd"})


def test_parse_oracle_info():
    body = b'{"oracleIdType":"MSISDN","endpoint":{"value":"http://oracle:8444/base","endpointType":"URL"},' \
           b'"currency":"USD","isDefault":true}'
    assert parse_oracle_info(body) == ("MSISDN", "http://oracle:8444/base", "USD", True)
    assert parse_oracle_info(b'{"oracleIdType":"CONSENT","endpoint":{"value":"builtin","endpointType":"URL"}}') == (
        "CONSENT", "builtin", None, False)
    for bad, code in ((b"[]", 3101), (b"{", 3101), (b'{"oracleIdType":"MSISDN"}', 3102),
                      (b'{"oracleIdType":"MSISDN","endpoint":{"value":"ftp://x","endpointType":"URL"}}', 3101),
                      (b'{"oracleIdType":"MSISDN","endpoint":{"value":"http://x?q=1","endpointType":"URL"}}', 3101),
                      (b'{"oracleIdType":"MSISDN","endpoint":{"value":"http://x","endpointType":"DNS"}}', 3101)):
        with pytest.raises(_Invalid) as refused:
            parse_oracle_info(bad)
        assert refused.value.code == code, bad


def test_builtin_oracle_rules_and_races(database_url):
    async def scenario():
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
        try:
            oracle = BuiltinOracle(pool)
            key = PartyKey("MSISDN", "255700000001")
            assert await oracle.lookup(key, None) == []
            assert await oracle.register(key, "fspa", "USD") is Registered.OK
            assert await oracle.register(key, "fspa", "USD") is Registered.OK  # the holder may repeat
            assert await oracle.register(key, "fspb", "USD") is Registered.OTHER_OWNER
            assert await oracle.register(key, "fspb", None) is Registered.OTHER_OWNER  # "any" overlaps USD
            assert await oracle.register(key, "fspb", "EUR") is Registered.OK
            assert await oracle.lookup(key, None) == ["fspa", "fspb"]
            assert await oracle.lookup(key, "EUR") == ["fspb"]
            assert await oracle.lookup(key, "GBP") == []
            assert await oracle.lookup(PartyKey("MSISDN", "255700000001", "sub"), None) == []
            assert await oracle.delete(key, "fspb", "USD") is Deleted.NOT_OWNER
            assert await oracle.delete(key, "fspc", None) is Deleted.NOT_OWNER
            assert await oracle.delete(key, "fspb", None) is Deleted.OK
            assert await oracle.lookup(key, None) == ["fspa"]
            assert await oracle.delete(key, "fspb", None) is Deleted.NOT_OWNER  # fspa still holds it
            assert await oracle.delete(PartyKey("MSISDN", "255700000009"), "fspa", None) is Deleted.NOT_FOUND

            # Bulk: duplicates in one request get one answer each; a party held elsewhere is refused.
            other = PartyKey("MSISDN", "255700000002")
            reasons = await oracle.register_many([(other, "fspc"), (key, "fspc"), (other, "fspc")], None, "r1")
            assert reasons == [None, "registered to another FSP", None]

            # Two FSPs racing for one party, one for "any currency" and one for USD: exactly one wins.
            for round_number in range(20):
                contested = PartyKey("ALIAS", f"race{round_number}")
                outcomes = await asyncio.gather(
                    oracle.register(contested, "fspx", None), oracle.register(contested, "fspy", "USD")
                )
                assert sorted(outcomes) == [Registered.OK, Registered.OTHER_OWNER], outcomes
                assert len(await oracle.lookup(contested, None)) == 1
        finally:
            await pool.close()

    uvloop.run(scenario())
