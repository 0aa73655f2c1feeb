"""What routing to the instance holding a conversation's media costs (two instances, one Redis).

Two ``python -m gateway serve`` processes on loopback share a real ``redis-server`` (AOF,
``appendfsync always``). For each of ``--n`` conversations, one instance (A) holds the media:

* **voice monitor**: ``POST /v1/conversations/{cid}/monitors`` with ``{"kind": "webrtc"}`` then
  ``DELETE`` it, sent to A (served there) and to B (forwarded to A, which answers; B waits until
  its copy of the store has the monitor): the time to the 201;
* **INVITE**: a per-leg INVITE to A's SIP address (placed there) and to B's (relayed to A by
  B's front, stateless): the time to the 200 (then ACK and BYE).

Prints p50 / p99 in ms of each, direct and routed, side by side, with the load average.

    .venv/bin/python bench/cluster.py            # 150 conversations
    .venv/bin/python bench/cluster.py --smoke    # 20, ~20 s in all
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from devtools.redis_server import start_redis
from tests.sip_support import RawSip, in_dialog_request, sdp
from tests.test_cluster import Instance, start_instance, stop_instance

#: Gateway settings of both instances: no INVITE or monitor-start limit in the way, calls without RTP kept.
SETTINGS = {
    "sip_invite_rate": "100000",
    "sip_invite_burst": "100000",
    "sip_media_timeout": "0",
    "monitor_starts_per_minute": "0",
}


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def monitor_times(via: Instance, cids: list[str]) -> list[float]:
    token = await via.client.login("sam")
    times = []
    for cid in cids:
        started = time.perf_counter()
        answer = await via.client.call(
            "POST", f"/v1/conversations/{cid}/monitors", token, {"voice": {"kind": "webrtc"}}
        )
        times.append(time.perf_counter() - started)
        assert answer.status == 201 and "voice" in answer.body["channels"], answer.body
        assert (await via.client.call("DELETE", f"/v1/monitors/{answer.body['id']}", token)).status == 204
    return times


async def invite_times(
    raw: RawSip, port: int, cids: list[str], leg: str
) -> tuple[list[float], list[tuple[bytes, str]]]:
    """The time of each INVITE to its 200 (ACKed); the calls, to hang up later."""
    times, calls = [], []
    for cid in cids:
        data, _, _ = raw.invite(port, body=sdp(port=49170), headers={"X-Conversation-ID": cid, "X-Leg": leg})
        started = time.perf_counter()
        status, text = await raw.request(data, port)
        times.append(time.perf_counter() - started)
        assert status == 200, text
        calls.append((data, text))
    return times, calls


async def hang_up(raw: RawSip, port: int, calls: list[tuple[bytes, str]]) -> None:
    for data, text in calls:
        raw.send(in_dialog_request("BYE", data, text, 2), port)  # along the route set: to the owner
        await raw.recv(2.0)


async def run(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, start_redis(Path(tmp) / "redis") as redis:
        async with aiohttp.ClientSession() as http:
            a = await start_instance(Path(tmp), "gw-a", redis, "bench:", http, **SETTINGS)
            b = await start_instance(Path(tmp), "gw-b", redis, "bench:", http, idp=a.url, **SETTINGS)
            try:
                cids = [f"bc{i}" for i in range(n)]
                platform = await a.client.platform()
                for cid in cids:
                    body = {
                        "direction": "inbound",
                        "agent": "alice",
                        "customer": {"id": "c"},
                        "sessions": ["chat", "voice"],
                    }
                    assert (await a.client.call("PUT", f"/v1/conversations/{cid}", platform, body)).status == 201
                raw = RawSip()
                try:
                    # A holds each conversation's media: its agent leg is placed there (and stays up)
                    agent, agent_calls = await invite_times(raw, a.sip_port, cids, "agent")
                    monitors = (await monitor_times(a, cids), await monitor_times(b, cids))
                    customer, customer_calls = await invite_times(raw, b.sip_port, cids, "customer")
                    await hang_up(raw, a.sip_port, agent_calls + customer_calls)
                finally:
                    raw.close()
                rows = {"voice monitor (POST)": monitors, "INVITE to 200": (agent, customer)}
            finally:
                await stop_instance(b)
                await stop_instance(a)
    load = os.getloadavg()
    print(f"\n{n} conversations, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 instances, 1 Redis)")
    print(f"{'':<22}  {'on the owner':>18}  {'via the other':>18}")
    print(f"{'ms':<22}  {'p50':>8}  {'p99':>8}  {'p50':>8}  {'p99':>8}")
    print("-" * 64)
    for name, (direct, routed) in rows.items():
        d50, d99 = percentiles(direct)
        r50, r99 = percentiles(routed)
        print(f"{name:<22}  {d50:>8.2f}  {d99:>8.2f}  {r50:>8.2f}  {r99:>8.2f}")
    print("(the INVITE via the other is a customer leg relayed to the owner, which holds the agent leg)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n",
        type=int,
        default=150,
        help="conversations (each: one monitor and one INVITE per way; one SIP worker holds ~170)",
    )
    ap.add_argument("--smoke", action="store_true", help="20 conversations")
    args = ap.parse_args()
    asyncio.run(run(20 if args.smoke else args.n))


if __name__ == "__main__":
    main()
