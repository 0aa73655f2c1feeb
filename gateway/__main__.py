"""``python -m gateway serve``: run the gateway; SIGTERM drains before stopping.

``python -m gateway audit verify`` checks the audit log's hash chain (exit 0 intact, 1 naming the
first broken record); ``python -m gateway audit export [--output FILE] [--after ID]`` writes it as
JSON lines for a SIEM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from gateway.config import ConfigurationError, Settings
from gateway.logs import setup_logging
from gateway.policy import audit

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
    audit_cmd = sub.add_parser("audit", help="check or export the audit log")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    db_help = "audit database (default: GATEWAY_AUDIT_DB, else GATEWAY_DATA_DIR/audit.sqlite3)"
    verify = audit_sub.add_parser("verify", help="check the hash chain; exit 1 naming the first broken record")
    verify.add_argument("--db", type=Path, help=db_help)
    export = audit_sub.add_parser("export", help="write the records as JSON lines (for a SIEM)")
    export.add_argument("--db", type=Path, help=db_help)
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    export.add_argument("--after", type=int, default=0, help="only records with an id above this one")
    return parser.parse_args(argv)


def audit_main(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.db or (
        Path(settings.audit_db) if settings.audit_db else Path(settings.data_dir) / "audit.sqlite3"
    )
    if not path.is_file():
        print(f"no audit log at {path}", file=sys.stderr)
        return 2
    if args.audit_command == "verify":
        report = audit.verify(path)
        if not report.intact:
            print(f"audit log {path} is broken: {report.broken}")
            return 1
        legacy = f" ({report.legacy} from before the chain, sealed by it)" if report.legacy else ""
        print(f"audit log {path} intact: {report.records} records{legacy}; head {report.head}")
        return 0
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for record in audit.read_records(path, after=args.after):
            out.write(audit.export_line(record) + "\n")
    except BrokenPipeError:  # `audit export | head`: the reader has what it wanted
        sys.stderr.close()
    finally:
        if args.output:
            out.close()
    return 0


async def serve(settings: Settings) -> None:
    # Imported here: the audit commands need none of the server (aiohttp, aiortc, pjsua2 plumbing).
    from aiohttp import web

    from gateway.api.context import CLUSTER, RUNTIME, SERVICE, SIP
    from gateway.app import create_app, make_runner

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
            cluster = app.get(CLUSTER)
            if cluster is not None:
                cluster.poke()  # the other instances (and their forwarding) know at once
            log.info("draining for up to %.0fs", settings.drain_seconds)
            drain_task.append(asyncio.ensure_future(drain()))

        async def drain() -> None:
            deadline = loop.time() + settings.drain_seconds
            while loop.time() < deadline and busy():
                await asyncio.sleep(0.2)
            stop.set()

        def busy() -> bool:
            sip = app.get(SIP)
            if sip is not None and sip.stats().get("calls", 0) > 0:
                return True
            if CLUSTER in app:  # the monitors of the whole cluster are in the store: count this one's
                return bool(app[CLUSTER].owned)
            return app[SERVICE].active_monitors() > 0

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "audit":
        raise SystemExit(audit_main(args, Settings.from_env()))
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
