"""``python -m gateway serve``: run the gateway; SIGTERM drains before stopping."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from aiohttp import web

from gateway.api.context import RUNTIME, SERVICE, SIP
from gateway.app import create_app, make_runner
from gateway.config import ConfigurationError, Settings
from gateway.logs import setup_logging

log = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway", description="Silent-monitoring media gateway")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (default)")
    serve.add_argument("--host", help="HTTP address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (GATEWAY_PORT, default 8080)")
    serve.add_argument("--sip-port", type=int, help="SIP port for platforms (GATEWAY_SIP_PORT, default 5060)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: embedded demo identity provider (GATEWAY_DEV)",
    )
    serve.add_argument("--demo", action="store_true", default=None, help="also run the demo platform (GATEWAY_DEMO)")
    return parser.parse_args(argv)


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = make_runner(app)
    await runner.setup()
    try:  # whatever fails after setup, the cleanup contexts run (no orphaned SIP workers)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        log.info("gateway listening on %s (SIP %s:%s)", settings.base_url, settings.sip_host, settings.sip_port)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0
        drain_task: list[asyncio.Future[None]] = []

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:  # a second signal: stop now
                stop.set()
                return
            # Drain: /readyz fails at once so load balancers move on, SIP answers 503, new monitors
            # are refused; running conversations get up to drain_seconds to finish.
            app[RUNTIME].draining = True
            sip = app.get(SIP)
            if sip is not None:
                sip.set_draining(True)
            log.info("draining for up to %.0fs", settings.drain_seconds)
            drain_task.append(asyncio.ensure_future(drain()))

        async def drain() -> None:
            deadline = loop.time() + settings.drain_seconds
            while loop.time() < deadline and busy():
                await asyncio.sleep(0.2)
            stop.set()

        def busy() -> bool:
            sip = app.get(SIP)
            return app[SERVICE].active_monitors() > 0 or (sip is not None and sip.stats().get("calls", 0) > 0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings.from_env().with_overrides(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        sip_port=getattr(args, "sip_port", None),
        dev=getattr(args, "dev", None),
        demo=getattr(args, "demo", None),
    )
    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except ConfigurationError as exc:  # unsafe or incomplete settings: one line saying what to set
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    except OSError as exc:  # a port taken by another process: say which, no traceback
        log.error(
            "cannot start: %s (HTTP %s:%s, SIP %s:%s)",
            exc,
            settings.host,
            settings.port,
            settings.sip_host,
            settings.sip_port,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
