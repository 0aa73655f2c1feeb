"""Shared fixtures: a real gateway on loopback (embedded identity provider, or a real Keycloak)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import GatewayClient, make_settings, running_gateway


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayClient]:
    """The gateway with its embedded identity provider and SIP disabled (control-plane tests)."""
    async with running_gateway(make_settings(tmp_path)) as client:
        yield client
