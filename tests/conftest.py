"""Shared fixtures: a real gateway on loopback (embedded identity provider, or a real Keycloak)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.keycloak import KeycloakServer, start_keycloak
from tests.support import GatewayClient, make_settings, running_gateway


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayClient]:
    """The gateway with its embedded identity provider and SIP disabled (control-plane tests)."""
    async with running_gateway(make_settings(tmp_path)) as client:
        yield client


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeycloakServer]:
    """One real Keycloak for the whole run (started once: it takes tens of seconds)."""
    with start_keycloak(tmp_path_factory.mktemp("keycloak")) as server:
        yield server
