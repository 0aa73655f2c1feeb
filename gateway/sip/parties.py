"""Who is who on a recorded call: the addresses a platform gives for the agent and the
customer, and how a SIPREC participant's AoR is compared with them.

Real AoRs are extensions and E.164 numbers, with or without ``sip:``/``sips:``/``tel:``, with a
host or without (Ribbon, AudioCodes): two addresses name the same party when their user parts
agree, case-insensitively, a phone number compared by its digits only (``+1 (555) 010-0`` and
``tel:15550100`` agree).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SCHEME = re.compile(r"^(?:sips?|tel):", re.I)
_PHONE = re.compile(r"^\+?[0-9 ().\-]+$")


@dataclass(frozen=True)
class Parties:
    """What the platform said about a conversation's parties (``PUT /v1/conversations``)."""

    agent: str  # the agent's username (matched as a user part too)
    agent_addresses: tuple[str, ...] = ()
    customer_addresses: tuple[str, ...] = ()


def address_key(address: str) -> str:
    """The comparable form of an address: its user part, lower-case; a phone number's digits.

    ``"Ann" <sip:+1-555-0100@pstn.example;user=phone>`` → ``15550100``;
    ``tel:+15550100`` → ``15550100``; ``4001`` → ``4001``; ``sip:Alice@pbx`` → ``alice``.
    """
    a = address.strip()
    if "<" in a:
        a = a.split("<", 1)[1].split(">", 1)[0]
    a = _SCHEME.sub("", a.strip())
    a = a.split("?", 1)[0]
    user = a.rsplit("@", 1)[0] if "@" in a else a
    user = user.split(";", 1)[0].strip()
    if _PHONE.match(user) and any(c.isdigit() for c in user):
        return re.sub(r"\D", "", user)
    return user.lower()


def matching(aors: Iterable[str], addresses: Iterable[str]) -> str | None:
    """The first of ``aors`` that names one of ``addresses``, or None."""
    keys = {address_key(a) for a in addresses} - {""}
    for aor in aors:
        if address_key(aor) in keys:
            return aor
    return None
