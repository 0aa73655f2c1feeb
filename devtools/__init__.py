"""Development tools, kept out of the shipped ``gateway`` package (the Docker image has none of them).

* :mod:`devtools.idp`: the embedded identity provider (Keycloak's paths, the demo realm);
* :mod:`devtools.demo` and :mod:`devtools.demo_legs`: the demo platform of ``make run``;
* :mod:`devtools.siprec_source` and :mod:`devtools.sip_phone`: pjsua2 SIPREC client and
  supervisor phone, for tests, benches and trying the gateway by hand;
* :mod:`devtools.fake_taps`: tone taps standing in for the SIP plane in media tests;
* :mod:`devtools.keycloak`: a real Keycloak for the integration tests (``scripts/keycloak.sh``).

The gateway loads :func:`install` only when asked for the embedded provider or the demo.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config import Settings


def install(app: web.Application, settings: Settings) -> None:
    """Add the embedded identity provider (no Keycloak configured) and the demo platform
    (``settings.demo``) to a gateway app built by ``gateway.app.create_app``."""
    if settings.embedded_idp:
        from devtools.idp import add_idp_routes

        add_idp_routes(app, settings)
    if settings.demo:

        async def demo_ctx(app: web.Application) -> AsyncIterator[None]:
            from devtools.demo import DemoPlatform

            demo = DemoPlatform(settings)
            await demo.start()
            yield
            await demo.stop()

        app.cleanup_ctx.append(demo_ctx)
