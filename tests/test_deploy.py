"""deploy/compose.yaml (Redis + Kamailio + N gateway instances) can not run here (no Docker
engine): it is parsed and checked against what the services will really read: every
``GATEWAY_*`` name is a setting of ``gateway/config.py``, every ``KAMAILIO_*`` one is read by
``deploy/kamailio/kamailio.cfg``, Redis persists as the gateway requires, the builds exist,
Kamailio's dispatcher list names every instance's SIP front, and no two services (all on the
host's network) use the same port."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Settings
from gateway.sip.supervisor import ephemeral_ports, rtp_ports_per_worker

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
#: What compose would substitute for ${HOST_ADDRESS} etc. when they are set.
VARIABLES = {"HOST_ADDRESS": "192.0.2.10", "KEYCLOAK_URL": "https://kc.example", "ADMIN_CLIENT_SECRET": "s3cret"}


def substitute(value: Any) -> Any:
    """Compose's ``${NAME}`` and ``${NAME:?message}`` interpolation, for the variables above."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: VARIABLES[m.group(1)], value)
    if isinstance(value, dict):
        return {k: substitute(v) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # the merge keys (<<) of the shared gateway parts too
    assert isinstance(data, dict)
    return dict(substitute(data))


def gateways(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name.startswith("gateway-")}


def test_services_and_their_builds(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "kamailio"} <= set(services) and len(gateways(compose)) >= 2
    for name, service in gateways(compose).items():
        build = DEPLOY / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")
        assert build.resolve() == (DEPLOY.parent / "Dockerfile").resolve(), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    kamailio = DEPLOY / services["kamailio"]["build"]["context"]
    assert (kamailio / "Dockerfile").is_file() and (kamailio / "kamailio.cfg").is_file()
    assert "kamailio.cfg" in (kamailio / "Dockerfile").read_text()  # the repository's configuration
    assert set(services["kamailio"]["depends_on"]) == set(gateways(compose))
    assert all(s.get("network_mode") == "host" for s in services.values())  # RTP straight to each instance


def test_every_setting_exists(compose: dict[str, Any]) -> None:
    known = {f"GATEWAY_{f.name.upper()}" for f in fields(Settings)}
    for name, service in gateways(compose).items():
        env = service["environment"]
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        settings = Settings.from_env({k: str(v) for k, v in env.items()})
        assert settings.startup_problem() is None, name  # it would start (no dev mode, no demo secret)
        assert not settings.dev and settings.redis_url and settings.redis_require_fsync
    cfg = (DEPLOY / "kamailio" / "kamailio.cfg").read_text()
    read = set(re.findall(r"^#!trydefenvs? \w+=(KAMAILIO_\w+)", cfg, re.M))
    assert set(compose["services"]["kamailio"]["environment"]) <= read


def test_redis_persists_as_the_gateway_requires(compose: dict[str, Any]) -> None:
    command = [str(c) for c in compose["services"]["redis"]["command"]]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--bind"] == "127.0.0.1"  # host network: not reachable from outside
    port = int(options["--port"])
    for service in gateways(compose).values():
        assert service["environment"]["GATEWAY_REDIS_URL"] == f"redis://127.0.0.1:{port}/0"
    assert compose["services"]["redis"]["volumes"]  # the AOF outlives the container


def test_ports_do_not_collide_and_kamailio_lists_every_instance(compose: dict[str, Any]) -> None:
    used: dict[tuple[str, int], str] = {}

    def take(name: str, proto: str, ports: range) -> None:
        for port in ports:
            assert (proto, port) not in used, f"{name} and {used[(proto, port)]} both use {proto} {port}"
            used[(proto, port)] = name

    redis = [str(c) for c in compose["services"]["redis"]["command"]]
    take("redis", "tcp", range(int(redis[redis.index("--port") + 1]), int(redis[redis.index("--port") + 1]) + 1))
    k_env = compose["services"]["kamailio"]["environment"]
    sip = int(k_env["KAMAILIO_SIP_PORT"])
    take("kamailio", "udp", range(sip, sip + 1))
    take("kamailio", "tcp", range(sip, sip + 1))
    lo, hi = ephemeral_ports()
    fronts = set()
    for name, service in gateways(compose).items():
        s = Settings.from_env({k: str(v) for k, v in service["environment"].items()})
        take(name, "tcp", range(s.port, s.port + 1))
        take(name, "udp", range(s.sip_port, s.sip_port + 1))
        take(name, "tcp", range(s.sip_port, s.sip_port + 1))
        workers = s.sip_worker_base_port or s.sip_port + 1
        take(name, "udp", range(workers, workers + s.sip_workers))
        rtp = range(s.rtp_port_base, s.rtp_port_base + s.sip_workers * rtp_ports_per_worker(s))
        take(name, "udp", rtp)
        assert rtp.stop - 1 < lo or rtp.start > hi, f"{name}: RTP ports overlap the ephemeral ones"
        assert f":{s.port}/healthz" in " ".join(service["healthcheck"]["test"])  # not the image's 8080
        fronts.add(s.sip_port)
    listed = (DEPLOY / "kamailio" / "dispatcher.list").read_text().split("\n")
    entries = [line.split() for line in listed if line.strip() and not line.startswith("#")]
    assert all(setid == "1" for setid, _ in entries)  # kamailio.cfg's gateway set
    assert {int(uri.rsplit(":", 1)[1]) for _, uri in entries} == fronts
