"""WebRTC listener bookkeeping of the API (``/v1/monitors/{mid}/whep``) with a fake SIP plane and
a fake answer, so it runs without aiortc: a new offer replaces the previous listener, DELETE is
idempotent, and a monitor that ends closes its listener. ``test_browser*.py`` runs the same
routes with Chromium and aiortc."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import gateway.api.whep_routes as whep_routes
from gateway.api.context import AUDIT, SIP, WHEP
from gateway.app import create_app, make_runner
from tests.support import GatewayClient, _wait_ready, make_settings

pytestmark = pytest.mark.api


class FakeTap:
    def close(self) -> None:
        return None


class FakeSipPlane:
    ready = True

    def open_tap(self, cid: str, maxsize: int = 50) -> FakeTap:
        return FakeTap()

    def wideband(self, cid: str) -> bool:
        return False

    async def hang_up_phone(self, monitor_id: str) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}


class FakeSession:
    count = 0

    def __init__(self) -> None:
        FakeSession.count += 1
        self.id = f"session-{FakeSession.count}"
        self.closed_with: str | None = None
        self._callbacks: list[Callable[[str], Any]] = []

    async def close(self, reason: str = "deleted") -> None:
        if self.closed_with is None:
            self.closed_with = reason
            for callback in self._callbacks:
                callback(reason)

    def on_closed(self, callback: Callable[[str], Any]) -> None:
        self._callbacks.append(callback)


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GatewayClient]:
    async def answer_whep(offer: str, tap: FakeTap, **options: Any) -> tuple[str, FakeSession]:
        return "v=0 (answer)", FakeSession()

    monkeypatch.setattr(whep_routes, "answer_whep", answer_whep)
    settings = make_settings(tmp_path)
    app = create_app(settings)
    app[SIP] = FakeSipPlane()  # type: ignore[assignment]
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    try:
        async with aiohttp.ClientSession() as http:
            client = GatewayClient(settings.base_url, settings.base_url, http, settings.realm, app)
            await _wait_ready(client)
            yield client
    finally:
        await runner.cleanup()


async def test_listeners_replace_delete_and_end_with_the_monitor(gateway: GatewayClient) -> None:
    assert gateway.app is not None
    listeners = gateway.app[WHEP]
    sam = await gateway.login("sam")
    assert (await gateway.conversation("w1")).status == 201
    started = await gateway.monitor("sam", "w1", {"kind": "webrtc"})
    assert started.status == 201 and "voice" in started.body["channels"]
    mid = started.body["id"]

    async def offer() -> str:
        answer = await gateway.call(
            "POST", f"/v1/monitors/{mid}/whep", sam, data="v=0 (offer)", headers={"Content-Type": "application/sdp"}
        )
        assert answer.status == 201 and answer.body == "v=0 (answer)"
        return str(answer.headers["Location"])

    first = await offer()
    (first_session,) = listeners[mid].values()
    second = await offer()  # a reloaded console page
    assert first_session.closed_with == "replaced" and len(listeners[mid]) == 1
    (second_session,) = listeners[mid].values()
    assert second.endswith(second_session.id) and first != second

    assert (await gateway.call("DELETE", second, sam)).status == 204
    assert second_session.closed_with == "deleted" and listeners[mid] == {}
    assert (await gateway.call("DELETE", second, sam)).status == 204  # idempotent

    await offer()
    (third_session,) = listeners[mid].values()
    assert (await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
    for _ in range(50):
        if third_session.closed_with is not None:
            break
        await asyncio.sleep(0.02)
    assert third_session.closed_with == "deleted" and mid not in listeners
    audited = gateway.app[AUDIT].query(conversation="w1", action="webrtc_listen")
    assert len(audited) == 3

    gone = await gateway.call(
        "POST", f"/v1/monitors/{mid}/whep", sam, data="v=0", headers={"Content-Type": "application/sdp"}
    )
    assert (gone.status, gone.code) == (409, "monitor_ended")
