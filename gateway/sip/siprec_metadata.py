"""SIPREC recording metadata as real recording clients send it: one parser per dialect behind
:func:`parse_metadata`.

Dialects (the root element decides, never the namespace: SBCs spell it several ways):

* RFC 7865 ``<recording>`` in ``urn:ietf:params:xml:ns:recording:1``, the draft namespace
  without ``:1`` (Oracle/Acme, Ribbon's draft-07 profile), a prefixed namespace (``tns:``), or
  none; participants by ``<nameID aor>`` (RFC) or ``<aor>`` (drafts), streams by
  ``<participantstreamassoc>`` (RFC) or ``<send>`` inside ``<participant>`` (drafts).
* BroadWorks' pre-RFC ``<recording_metadata>``: participants with ``<address>``/``<aor>`` and
  the labels of the streams they send.

Besides who sends on which stream label, each parser collects the identifiers of the recorded
call the platform may know (:attr:`RecordingMetadata.keys`): the RFC 7989 ``<sipSessionID>``,
Call-IDs, and every value in vendor extension data (Oracle ``apkt:ucid``, Ribbon
``<callData>``'s ``callid``/``gcid``, Cisco GUIDs, BroadWorks tracking ids). Parsing uses
defusedxml: entities and DTDs are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET

#: Element names that carry an explicit conversation id (the gateway's own convention).
_CID_NAMES = {"conversation-id", "conversationid", "conversation_id", "x-conversation-id", "cid"}
#: Elements whose text identifies the recorded call wherever they appear.
_KEY_NAMES = {
    "sipsessionid", "session-id", "sessionid", "callid", "call-id", "call_id", "ucid", "gcid", "guid",
    "callguid", "cisco-guid", "gucid", "exttrackingid", "trackingid", "broadworkscallid", "globalcallid",
    "avayaucid", "genesysuuid",
}  # fmt: skip
#: Containers of vendor data: every leaf inside is a candidate key.
_EXTENSION_NAMES = {"extensiondata", "calldata", "extendedcallinfo"}
_MAX_KEY = 256
#: Avaya's UCID inside User-to-User data: shared-UUI item 0xFA of 8 bytes (node id, sequence,
#: timestamp), optionally after the protocol discriminator 00.
_UUI_UCID = re.compile(r"^(?:00)?FA08([0-9A-F]{16})", re.I)
#: Cisco's ``Cisco-Guid`` header: the call GUID as four 32-bit decimal numbers.
_CISCO_GUID = re.compile(r"^(\d{1,10})-(\d{1,10})-(\d{1,10})-(\d{1,10})$")


class MetadataError(ValueError):
    """Metadata that is not XML, is refused (entities, DTD) or is no known dialect."""


@dataclass
class RecordingMetadata:
    dialect: str
    conversation: str | None = None
    #: Identifiers of the recorded call (duplicates removed, order kept).
    keys: list[str] = field(default_factory=list)
    #: stream label → AoRs of the participants that *send* on it
    label_aors: dict[str, list[str]] = field(default_factory=dict)


def parse_metadata(xml: bytes) -> RecordingMetadata:
    """Parse recording metadata of any supported dialect (raises :class:`MetadataError`)."""
    try:
        root: Element = SafeET.fromstring(xml)
    except Exception as exc:  # defusedxml raises several types; all mean "refuse"
        raise MetadataError(f"invalid metadata XML: {type(exc).__name__}") from exc
    parser = _DIALECTS.get(_local(root.tag))
    if parser is None:
        raise MetadataError(f"unknown metadata root <{_local(root.tag)[:40]}>")
    meta = parser(root)
    meta.conversation = _first_text(root, _CID_NAMES)
    meta.keys = _dedupe(_call_keys(root))
    return meta


# --- helpers ---------------------------------------------------------------------------------


def _local(tag: object) -> str:
    """Local name, lower-case, whatever namespace or prefix (``{urn:..}Stream`` → ``stream``)."""
    t = tag if isinstance(tag, str) else ""
    return t.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()


def _text(el: Element) -> str:
    return (el.text or "").strip()


def _attr(el: Element, *names: str) -> str:
    """The first present attribute among ``names``, namespace prefixes ignored."""
    wanted = {n.lower() for n in names}
    for key, value in el.attrib.items():
        if _local(key) in wanted and value.strip():
            return value.strip()
    return ""


def _children(el: Element, name: str) -> Iterator[Element]:
    return (c for c in el if _local(c.tag) == name)


def _first_text(root: Element, names: set[str]) -> str | None:
    for el in root.iter():
        if _local(el.tag) in names and _text(el):
            return _text(el)
    return None


def _call_keys(root: Element) -> Iterator[str]:
    for el in root.iter():
        name = _local(el.tag)
        if name in _KEY_NAMES and _text(el):
            yield _text(el)
        if name in _EXTENSION_NAMES:
            for leaf in el.iter():
                if len(leaf) == 0 and _text(leaf):
                    yield _text(leaf)


def _dedupe(keys: Iterable[str]) -> list[str]:
    out: dict[str, None] = {}
    for key in keys:
        if len(key) <= _MAX_KEY:
            out.update(dict.fromkeys(recording_key_forms(key)))
    return list(out)


def recording_key_forms(value: str) -> list[str]:
    """The forms a platform may know an identifier by: as sent, without its ``;parameters``
    (``abc;remote=000`` → ``abc``), and for Avaya User-to-User data carrying a UCID
    (``00FA08`` + 8 bytes hex) the UCID in hex and in Avaya's 20-digit decimal form
    (node id 5 digits, sequence 5, timestamp 10); for a ``Cisco-Guid`` (four decimal 32-bit
    numbers) the 32-hex-digit call GUID Cisco's contact centre logs."""
    value = value.strip()
    bare = value.split(";", 1)[0].strip()
    forms = [f for f in dict.fromkeys((value, bare)) if f]
    m = _UUI_UCID.match(bare)
    if m:
        raw = bytes.fromhex(m.group(1))
        node, seq, stamp = (
            int.from_bytes(raw[:2], "big"),
            int.from_bytes(raw[2:4], "big"),
            int.from_bytes(raw[4:], "big"),
        )
        forms += [m.group(1), f"{node:05d}{seq:05d}{stamp:010d}"]
    g = _CISCO_GUID.match(bare)
    if g and all(int(part) < 2**32 for part in g.groups()):
        forms.append("".join(f"{int(part):08X}" for part in g.groups()))
    return forms


def _participant_aors(el: Element) -> list[str]:
    aors: list[str] = []
    for sub in el.iter():
        name = _local(sub.tag)
        if name == "nameid" and _attr(sub, "aor"):
            aors.append(_attr(sub, "aor"))
        elif name in ("aor", "address", "uri", "number") and _text(sub):
            aors.append(_text(sub))
    return aors


# --- dialects --------------------------------------------------------------------------------


def _parse_rfc7865(root: Element) -> RecordingMetadata:
    """RFC 7865 and its drafts (namespace with or without ``:1``, any prefix)."""
    participants: dict[str, list[str]] = {}
    sends: dict[str, list[str]] = {}  # participant id → stream ids
    stream_label: dict[str, str] = {}
    for el in root:
        name = _local(el.tag)
        if name == "participant":
            pid = _attr(el, "participant_id", "id")
            participants[pid] = _participant_aors(el)
            for sub in el.iter():
                if _local(sub.tag) == "send" and _text(sub):  # drafts: the association inside
                    sends.setdefault(pid, []).append(_text(sub))
        elif name == "stream":
            sid = _attr(el, "stream_id", "id")
            label = next((_text(s) for s in _children(el, "label") if _text(s)), "") or _attr(el, "label")
            if label:
                stream_label[sid] = label
        elif name == "participantstreamassoc":
            pid = _attr(el, "participant_id")
            sends.setdefault(pid, []).extend(_text(s) for s in _children(el, "send") if _text(s))
    label_aors: dict[str, list[str]] = {}
    for pid, sids in sends.items():
        for sid in sids:
            if sid in stream_label:
                label_aors.setdefault(stream_label[sid], []).extend(participants.get(pid, []))
    dialect = "rfc7865" if root.tag.startswith("{urn:ietf:params:xml:ns:recording:1}") else "rfc7865-draft"
    return RecordingMetadata(dialect, label_aors=label_aors)


def _parse_broadworks(root: Element) -> RecordingMetadata:
    """BroadWorks' pre-RFC ``<recording_metadata>``: each participant lists the labels of the
    streams it sends (``<send>`` or ``<stream label=..>``/``<label>`` children)."""
    label_aors: dict[str, list[str]] = {}
    for el in root.iter():
        if _local(el.tag) != "participant":
            continue
        aors = _participant_aors(el)
        labels = [_text(s) for s in el.iter() if _local(s.tag) in ("send", "label") and _text(s)]
        labels += [_attr(s, "label") for s in el.iter() if _local(s.tag) == "stream" and _attr(s, "label")]
        for label in labels:
            label_aors.setdefault(label, []).extend(aors)
    return RecordingMetadata("broadworks", label_aors=label_aors)


_DIALECTS: dict[str, Callable[[Element], RecordingMetadata]] = {
    "recording": _parse_rfc7865,
    "recording_metadata": _parse_broadworks,
}
