"""ILPv1 payment packets, fulfilments and conditions, the way Mojaloop DFSPs make them (RULES §7).

FSPIOP v1.1 carries the legacy ILPv1 "Interledger Payment" packet in ``ilpPacket``. Mojaloop's SDK
(sdk-standard-components ``IlpV1``, on ``ilp-packet@2.2.0`` ``serializeIlpPayment``) builds it as::

    0x01                              type: ILP payment
    OER length prefix                 envelope: length of what follows
      UInt64 big-endian               amount, in the currency's minor units (USD 99 -> 9900)
      OER var-octet-string            ILP address g.{fspId}.{partyIdType lower}.{partyIdentifier lower}[.{subId}]
      OER var-octet-string            data: ASCII of base64url(JSON of the Transaction object), no padding
      0x00                            extensions: none

and ``ilpPacket`` is base64url of those bytes, without padding. The payee's fulfilment is
HMAC-SHA256(secret, ASCII of the ``ilpPacket`` *string*) and the condition is SHA-256 of the 32-byte
fulfilment; both travel as base64url without padding (43 characters).

Two departures from the SDK, both invisible on the wire: the HMAC key here is the secret's bytes as
given (the SDK keys with the ASCII of base64(secret) — only the payee ever recomputes its own
fulfilments, so any fixed key works), and the decoder also reads the API Definition's own example
layout (no envelope length, no extensions byte, raw JSON in ``data``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

__all__ = [
    "CURRENCY_EXPONENTS",
    "IlpPayment",
    "b64url_decode",
    "b64url_encode",
    "build_ilp_packet",
    "condition_of",
    "currency_exponent",
    "decode_ilp_packet",
    "decode_transaction",
    "encode_ilp_payment",
    "fulfilment_matches",
    "hmac_fulfilment",
    "ilp_address",
    "ilp_amount",
    "make_condition",
    "new_secret",
    "transaction_data",
]

TYPE_ILP_PAYMENT = 1
_UINT64_MAX = 2**64 - 1

# ISO 4217 minor units, as in the SDK's src/lib/ilp/currency.json. Only the codes whose exponent is
# not 2 are listed; every other code (the SDK's 2-decimal ones, and any it lacks) uses 2.
CURRENCY_EXPONENTS: dict[str, int] = {
    "BHD": 3,
    "BIF": 0,
    "CLF": 4,
    "CLP": 0,
    "DJF": 0,
    "GNF": 0,
    "IQD": 3,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KMF": 0,
    "KRW": 0,
    "KWD": 3,
    "LYD": 3,
    "OMR": 3,
    "PYG": 0,
    "RWF": 0,
    "TND": 3,
    "UGX": 0,
    "UYI": 0,
    "UYW": 4,
    "VND": 0,
    "VUV": 0,
    "XAF": 0,
    "XOF": 0,
    "XPF": 0,
}

_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


# --------------------------------------------------------------------------------------------------
# base64url


def b64url_encode(data: bytes) -> str:
    """base64url without padding (BinaryString32 / the SDK's ilpPacket)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """base64url with or without ``=`` padding; standard-alphabet ``+``/``/`` are accepted too.

    Raises ValueError on anything else (whitespace, other characters, an impossible length).
    """
    text = text.replace("+", "-").replace("/", "_")
    if not _B64URL.match(text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1:
        raise ValueError("not base64url: impossible length")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error as exc:
        raise ValueError(f"not base64url: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Fulfilments and conditions


def new_secret() -> bytes:
    """A fresh 32-byte payee secret."""
    return os.urandom(32)


def hmac_fulfilment(secret: bytes, message: bytes) -> str:
    """HMAC-SHA256(secret, message) as a base64url fulfilment (the API Definition's Listing 12)."""
    return b64url_encode(hmac.new(secret, message, hashlib.sha256).digest())


def condition_of(fulfilment: str) -> str:
    """SHA-256 of the fulfilment's 32 bytes, base64url without padding. ValueError if not 32 bytes."""
    preimage = b64url_decode(fulfilment)
    if len(preimage) != 32:
        raise ValueError(f"a fulfilment is 32 bytes, this one is {len(preimage)}")
    return b64url_encode(hashlib.sha256(preimage).digest())


def fulfilment_matches(fulfilment: str, condition: str) -> bool:
    """The hub's check: ``condition == base64url(sha256(base64url_decode(fulfilment)))``."""
    try:
        return hmac.compare_digest(condition_of(fulfilment), condition)
    except (ValueError, TypeError):
        return False


def make_condition(secret: bytes, ilp_packet: str) -> tuple[str, str]:
    """``(fulfilment, condition)`` for an ``ilpPacket``: HMAC over the packet *string*, as the SDK does."""
    fulfilment = hmac_fulfilment(secret, ilp_packet.encode("ascii", "replace"))
    return fulfilment, condition_of(fulfilment)


# --------------------------------------------------------------------------------------------------
# Packet fields


def currency_exponent(currency: str) -> int:
    return CURRENCY_EXPONENTS.get(currency, 2)


def ilp_amount(amount: str | int | Decimal, currency: str) -> int:
    """An FSPIOP amount in the currency's minor units (``("99", "USD") -> 9900``).

    ValueError when the amount is negative, not a number, finer than the currency's minor unit (the
    SDK would write a fractional UInt64), or beyond UInt64.
    """
    try:
        value = Decimal(amount) if not isinstance(amount, Decimal) else amount
    except InvalidOperation:
        raise ValueError(f"not an amount: {amount!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not an amount: {amount!r}")
    minor = value.scaleb(currency_exponent(currency))
    if minor != minor.to_integral_value():
        raise ValueError(f"{amount} {currency} is finer than the currency's minor unit")
    result = int(minor)
    if result > _UINT64_MAX:
        raise ValueError(f"{amount} {currency} does not fit an ILP UInt64 amount")
    return result


def ilp_address(fsp_id: str, party_id_type: str, party_identifier: str, sub_id_or_type: str | None = None) -> str:
    """``g.{fspId}.{partyIdType lower}.{partyIdentifier lower}[.{subId lower}]`` (the SDK's ``_getIlpAddress``)."""
    address = f"g.{fsp_id}.{party_id_type.lower()}.{party_identifier.lower()}"
    if sub_id_or_type:
        address += f".{sub_id_or_type.lower()}"
    return address


def transaction_data(transaction: dict[str, Any]) -> bytes:
    """The packet's ``data``: ASCII of base64url(JSON) — compact JSON, UTF-8, like ``JSON.stringify``."""
    return b64url_encode(orjson.dumps(transaction)).encode("ascii")


# --------------------------------------------------------------------------------------------------
# OER


def _length_prefix(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    size = (length.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + length.to_bytes(size, "big")


def _var_octets(data: bytes) -> bytes:
    return _length_prefix(len(data)) + data


def _read_length(buffer: bytes, at: int) -> tuple[int, int]:
    """(length, offset after the prefix) of an OER length prefix at ``at``."""
    if at >= len(buffer):
        raise ValueError("ILP packet truncated: length prefix expected")
    first = buffer[at]
    if first < 0x80:
        return first, at + 1
    size = first & 0x7F
    if size == 0 or at + 1 + size > len(buffer):
        raise ValueError("ILP packet: bad length prefix")
    return int.from_bytes(buffer[at + 1 : at + 1 + size], "big"), at + 1 + size


def _read_var_octets(buffer: bytes, at: int) -> tuple[bytes, int]:
    length, at = _read_length(buffer, at)
    end = at + length
    if end > len(buffer):
        raise ValueError("ILP packet truncated: octet string runs past the end")
    return buffer[at:end], end


# --------------------------------------------------------------------------------------------------
# Packets


def encode_ilp_payment(amount: int, account: str, data: bytes = b"") -> bytes:
    """The binary ILPv1 payment packet, byte for byte as ``ilp-packet@2.2.0 serializeIlpPayment``."""
    if not 0 <= amount <= _UINT64_MAX:
        raise ValueError(f"ILP amount out of UInt64 range: {amount}")
    contents = amount.to_bytes(8, "big") + _var_octets(account.encode("ascii")) + _var_octets(data) + b"\x00"
    return bytes((TYPE_ILP_PAYMENT,)) + _var_octets(contents)


def build_ilp_packet(transaction: dict[str, Any]) -> str:
    """The ``ilpPacket`` string for a Transaction object, as the SDK's ``IlpV1.getResponseIlp``.

    ``transaction`` needs ``amount {amount, currency}`` and ``payee.partyIdInfo {fspId, partyIdType,
    partyIdentifier[, partySubIdOrType]}``; the whole object goes into ``data``.
    """
    money = transaction["amount"]
    party = transaction["payee"]["partyIdInfo"]
    account = ilp_address(party["fspId"], party["partyIdType"], party["partyIdentifier"], party.get("partySubIdOrType"))
    packet = encode_ilp_payment(ilp_amount(money["amount"], money["currency"]), account, transaction_data(transaction))
    return b64url_encode(packet)


@dataclass(frozen=True, slots=True)
class IlpPayment:
    amount: int  # minor units of the transfer currency
    account: str  # ILP address of the payee
    data: bytes  # as carried: SDK = ASCII base64url(JSON); the spec's example = raw JSON

    @property
    def transaction(self) -> dict[str, Any] | None:
        """The Transaction object in ``data`` (either encoding), or None when it holds something else."""
        data = self.data.strip()
        try:
            raw = data if data.startswith(b"{") else b64url_decode(data.decode("ascii"))
            value = orjson.loads(raw)
        except (ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None


def decode_ilp_packet(ilp_packet: str | bytes) -> IlpPayment:
    """Decode an ``ilpPacket`` (base64url text, or the binary packet). ValueError if it is not ILPv1.

    Reads the SDK's layout (envelope length + extensions byte) and, failing that, the API
    Definition's example layout (amount right after the type byte, nothing after ``data``).
    """
    binary = b64url_decode(ilp_packet) if isinstance(ilp_packet, str) else bytes(ilp_packet)
    if not binary or binary[0] != TYPE_ILP_PAYMENT:
        raise ValueError("not an ILPv1 payment packet (type byte is not 0x01)")
    try:
        length, at = _read_length(binary, 1)
        enveloped = at + length == len(binary) and length >= 8 + 2
    except ValueError:
        enveloped = False
    if not enveloped:
        at = 1  # the spec example: no envelope
    if at + 8 > len(binary):
        raise ValueError("ILP packet truncated: no amount")
    amount = int.from_bytes(binary[at : at + 8], "big")
    account, at = _read_var_octets(binary, at + 8)
    data, at = _read_var_octets(binary, at)
    try:
        address = account.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("ILP address is not ASCII") from None
    return IlpPayment(amount, address, data)


def decode_transaction(ilp_packet: str | bytes) -> dict[str, Any]:
    """The Transaction object inside an ``ilpPacket``; ValueError when there is none."""
    transaction = decode_ilp_packet(ilp_packet).transaction
    if transaction is None:
        raise ValueError("the ILP packet's data is not a JSON Transaction object")
    return transaction
