"""A per-supervisor limit on monitor start/leave churn (issue 11, item 7): 429
``monitor_rate_limited`` with ``Retry-After``, counted in the metrics and the audit log; leaving
is never limited (R12) and other supervisors are not affected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.api.context import AUDIT
from gateway.policy.limits import TokenBuckets
from tests.support import make_settings, running_gateway


@pytest.mark.unit
def test_token_buckets_burst_then_refill_per_key() -> None:
    now = [100.0]
    buckets: TokenBuckets[str] = TokenBuckets(rate=0.5, burst=3, clock=lambda: now[0])
    assert [buckets.take("sam") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("sam") == pytest.approx(2.0)  # the next token in 1 / 0.5 s
    assert buckets.take("tom") == 0.0  # one bucket per key
    now[0] += 1.0
    assert buckets.take("sam") == pytest.approx(1.0)  # a refused take spends nothing
    now[0] += 1.0
    assert buckets.take("sam") == 0.0
    now[0] += 1000.0
    assert [buckets.take("sam") for _ in range(4)][-1] > 0  # refills up to the burst, no further
    assert buckets.wait("sam") > 0 and buckets.wait("sam") == buckets.take("sam")  # wait() spends nothing
    assert TokenBuckets(0, 1).take("x") == 0.0 and not TokenBuckets(0, 1).enabled
    small: TokenBuckets[int] = TokenBuckets(rate=1, burst=1, clock=lambda: now[0], max_keys=10)
    for key in range(100):
        small.take(key)
        now[0] += 1.0  # the older buckets are full again, so they are forgotten
    assert small.keys_held <= 10


@pytest.mark.api
async def test_monitor_start_churn_is_limited_per_supervisor(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, monitor_start_burst=3, monitor_starts_per_minute=6)
    async with running_gateway(settings) as gw:
        await gw.conversation("c-churn")
        sam = await gw.login("sam")
        # A refused attempt spends nothing (here: monitoring an outbound conversation).
        assert (await gw.conversation("c-out", direction="outbound")).status == 201
        for _ in range(5):
            assert (await gw.monitor("sam", "c-out")).code == "outbound_not_supported"
        mids = []
        for _ in range(3):
            started = await gw.monitor("sam", "c-churn")
            assert started.status == 201, started.body
            mids.append(started.body["id"])
            assert (await gw.call("DELETE", f"/v1/monitors/{mids[-1]}", sam)).status == 204
        limited = await gw.monitor("sam", "c-churn")
        assert (limited.status, limited.code) == (429, "monitor_rate_limited"), limited.body
        assert 1 <= int(limited.headers["Retry-After"]) <= 11  # one start every 10 s
        # Nothing was opened, leaving is never limited, and tom has a bucket of his own.
        listed = await gw.call("GET", "/v1/conversations/c-churn", sam)
        assert listed.body["monitors"] == []
        assert (await gw.call("DELETE", f"/v1/monitors/{mids[0]}", sam)).status == 204
        assert (await gw.monitor("tom", "c-churn")).status == 201
        metrics = (await gw.call("GET", "/metrics")).body
        assert 'gateway_refusals_total{code="monitor_rate_limited"} 1.0' in metrics
        assert gw.app is not None
        refused = [r for r in gw.app[AUDIT].query(action="monitor_start") if r["outcome"] == "refused"]
        assert [r["code"] for r in refused] == ["outbound_not_supported"] * 5 + ["monitor_rate_limited"]
