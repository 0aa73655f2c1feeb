"""Embedded identity provider: Keycloak's OIDC and (a slice of its) admin paths, on the
gateway's own origin, loaded from a Keycloak realm export (``fixtures/realm-cx-dev.json``).

Used when no Keycloak is configured (``Settings.embedded_idp``)::

    from devtools.idp import add_idp_routes
    if settings.embedded_idp:
        add_idp_routes(app, settings)
"""

from .realm import Realm, RealmError, load_realm
from .server import IDP_KEY, EmbeddedIdp, add_idp_routes

__all__ = ["IDP_KEY", "EmbeddedIdp", "Realm", "RealmError", "add_idp_routes", "load_realm"]
