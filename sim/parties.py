"""The parties a simulated DFSP holds, and its answers to ``GET /parties`` (RULES.md 4 and 9).

Each simulated DFSP has a ``PartyRegistry``. As the payee FSP it answers the hub's forwarded
``GET /parties/{Type}/{ID}[/{SubId}]`` with ``PUT /parties/...`` carrying the full Party object
(partyIdInfo with its own fspId, name, personalInfo.complexName, dateOfBirth, merchant code), or
``PUT /parties/.../error`` 3204 when it holds no such party. Names are sent as given (UTF-8 JSON),
so accented and Burmese names reach the payer unchanged.

The registry also tells the payer side which OTP its customer was issued (``SimParty.otp``), for
transaction requests authorised on a POS or ATM (``sim/requests.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PARTY_ID_TYPES", "PartyKey", "PartyRegistry", "SimParty", "party_key_of_path"]

PARTY_ID_TYPES = ("MSISDN", "EMAIL", "PERSONAL_ID", "BUSINESS", "DEVICE", "ACCOUNT_ID", "IBAN", "ALIAS")

PartyKey = tuple[str, str, str | None]  # (partyIdType, partyIdentifier, partySubIdOrType)


@dataclass(frozen=True, slots=True)
class SimParty:
    """One account holder at a simulated DFSP."""

    party_id_type: str
    party_identifier: str
    party_sub_id: str | None = None
    name: str | None = None  # PartyName: a display name or nickname
    first_name: str | None = None
    middle_name: str | None = None
    last_name: str | None = None
    date_of_birth: str | None = None  # YYYY-MM-DD
    merchant_classification_code: str | None = None
    otp: str | None = None  # the OTP this customer was issued by its FSP (payer side of an OTP flow)

    def __post_init__(self) -> None:
        if self.party_id_type not in PARTY_ID_TYPES:
            raise ValueError(f"partyIdType must be one of {', '.join(PARTY_ID_TYPES)}: {self.party_id_type!r}")
        if not self.party_identifier or "/" in self.party_identifier or len(self.party_identifier) > 128:
            raise ValueError(f"partyIdentifier is 1..128 characters without '/': {self.party_identifier!r}")
        if self.party_sub_id is not None and (not self.party_sub_id or "/" in self.party_sub_id):
            raise ValueError(f"partySubIdOrType must be non-empty without '/': {self.party_sub_id!r}")

    @classmethod
    def named(cls, party_id_type: str, party_identifier: str, full_name: str, **options: Any) -> SimParty:
        """A party whose complexName comes from ``full_name``: first word, middle words, last word."""
        words = full_name.split()
        first = words[0] if words else None
        last = words[-1] if len(words) > 1 else None
        middle = " ".join(words[1:-1]) or None
        return cls(party_id_type, party_identifier, name=full_name, first_name=first, middle_name=middle,
                   last_name=last, **options)

    @property
    def key(self) -> PartyKey:
        return (self.party_id_type, self.party_identifier, self.party_sub_id)

    def id_info(self, fsp_id: str) -> dict[str, str]:
        """PartyIdInfo (with the holding FSP)."""
        info = {"partyIdType": self.party_id_type, "partyIdentifier": self.party_identifier}
        if self.party_sub_id is not None:
            info["partySubIdOrType"] = self.party_sub_id
        info["fspId"] = fsp_id
        return info

    def to_fspiop(self, fsp_id: str) -> dict[str, Any]:
        """The FSPIOP Party object, as the holding FSP ``fsp_id`` describes it."""
        party: dict[str, Any] = {"partyIdInfo": self.id_info(fsp_id)}
        if self.merchant_classification_code is not None:
            party["merchantClassificationCode"] = self.merchant_classification_code
        if self.name is not None:
            party["name"] = self.name
        complex_name = {
            key: value
            for key, value in (("firstName", self.first_name), ("middleName", self.middle_name),
                               ("lastName", self.last_name))
            if value is not None
        }
        personal: dict[str, Any] = {}
        if complex_name:
            personal["complexName"] = complex_name
        if self.date_of_birth is not None:
            personal["dateOfBirth"] = self.date_of_birth
        if personal:
            party["personalInfo"] = personal
        return party


class PartyRegistry:
    """The parties one DFSP holds, by (type, identifier, sub id)."""

    def __init__(self) -> None:
        self._parties: dict[PartyKey, SimParty] = {}

    def add(self, party: SimParty) -> SimParty:
        self._parties[party.key] = party
        return party

    def remove(self, party_id_type: str, party_identifier: str, party_sub_id: str | None = None) -> bool:
        return self._parties.pop((party_id_type, party_identifier, party_sub_id), None) is not None

    def get(self, party_id_type: str, party_identifier: str, party_sub_id: str | None = None) -> SimParty | None:
        return self._parties.get((party_id_type, party_identifier, party_sub_id))

    def find(self, id_info: Any) -> SimParty | None:
        """The party a PartyIdInfo object names, or None (also for anything that is not one)."""
        if not isinstance(id_info, dict):
            return None
        key = (id_info.get("partyIdType"), id_info.get("partyIdentifier"), id_info.get("partySubIdOrType"))
        return self._parties.get(key)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[SimParty]:
        return iter(list(self._parties.values()))

    def __len__(self) -> int:
        return len(self._parties)


def party_key_of_path(rest: str) -> PartyKey | None:
    """``parties/{Type}/{ID}[/{SubId}][/error]`` (percent-decoded, no leading slash) -> key, else None."""
    parts = rest.split("/")
    if parts and parts[-1] == "error":
        parts = parts[:-1]
    if len(parts) == 3:
        return (parts[1], parts[2], None)
    if len(parts) == 4:
        return (parts[1], parts[2], parts[3])
    return None
