"""The one registry of error codes (gateway/errors.py) against what uses and documents it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.errors import CODE_OF_STATUS, ERRORS, ErrorCode, GatewayError, http_status
from gateway.policy import rules

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
MESSAGES_JS = ROOT / "gateway" / "web" / "messages.js"
API_DOC = ROOT / "docs" / "API.md"


def _js_object_keys(source: str, name: str) -> set[str]:
    """The keys of ``const NAME = { key: "…", … };`` in a JS module."""
    match = re.search(rf"const {name} = \{{(.*?)\n\}};", source, re.S)
    assert match is not None, f"{name} not found in messages.js"
    return set(re.findall(r"^\s*([a-z_]+):", match.group(1), re.M))


def test_every_code_has_a_status_and_a_message() -> None:
    assert set(ERRORS) == set(ErrorCode)
    for code, info in ERRORS.items():
        assert 400 <= info.status <= 599, code
        assert info.message.strip(), code
    assert all(status == http_status(code) for status, code in CODE_OF_STATUS.items())


def test_every_code_the_console_explains_exists() -> None:
    source = MESSAGES_JS.read_text()
    explained = _js_object_keys(source, "GATEWAY_ERRORS")
    assert explained, "no gateway codes found in messages.js"
    assert explained <= {code.value for code in ErrorCode}, explained - {code.value for code in ErrorCode}
    voice_blocked = _js_object_keys(source, "VOICE_BLOCKED")
    known_reasons = {rules.VOICE_NOT_ACTIVE, rules.VOICE_NOT_REQUESTED, rules.VOICE_STARTED_AFTER_CHAT_MONITORING}
    assert voice_blocked <= known_reasons | {code.value for code in ErrorCode}


def test_every_code_is_documented_in_the_api_doc() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", API_DOC.read_text(), re.M))
    for code, info in ERRORS.items():
        assert (code.value, str(info.status)) in documented, f"{code.value} ({info.status}) is missing from docs/API.md"


def test_a_refusal_carries_the_code_and_the_registry_gives_its_status() -> None:
    default = GatewayError(ErrorCode.VOICE_MONITOR_BUSY)
    assert default.message == ERRORS[ErrorCode.VOICE_MONITOR_BUSY].message
    assert default.status == 409
    custom = GatewayError(ErrorCode.INVALID_FIELD, "field 'agent' is wrong", field="agent")
    assert custom.to_json() == {
        "error": {"code": "invalid_field", "message": "field 'agent' is wrong", "field": "agent"}
    }
    with pytest.raises(ValueError):
        GatewayError("no_such_code")  # type: ignore[arg-type]
