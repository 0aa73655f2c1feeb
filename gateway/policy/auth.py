"""Who is calling: Keycloak access tokens, realm roles and teams.

* Tokens are validated locally against a cached JWKS (RS256 only; ``iss``, ``exp``, ``nbf``,
  audience or ``azp``, ``typ``=Bearer). An unknown ``kid`` refetches the JWKS at most once per
  ``jwks_refetch_interval`` seconds, so a flood of forged tokens never turns into a flood of
  requests to Keycloak. While Keycloak is down, cached keys keep validating. Before the first
  keys are loaded (start-up), a token is answered 503 ``identity_unavailable`` with
  ``Retry-After``, never 401: it may be valid, and a client throws a refused token away.
* Teams come from Keycloak groups through python-keycloak's async admin API, resolved once per
  login session (the token's ``sid``) and cached for it: a change in Keycloak applies after the
  next login (rule R2). A lookup that cannot reach Keycloak fails closed with 503
  ``identity_unavailable`` within ``identity_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from jwcrypto import jwk, jws
from jwcrypto.common import JWException
from keycloak import KeycloakAdmin, KeycloakOpenID, KeycloakOpenIDConnection

from gateway.config import Settings
from gateway.domain import Principal
from gateway.errors import GatewayError, identity_unavailable, invalid_token
from gateway.policy import rules

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
T = TypeVar("T")


class JwksCache:
    """The realm's signing keys, fetched through python-keycloak and kept across outages."""

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, Any]]], refetch_interval: float, timeout: float) -> None:
        self._fetch = fetch
        self._refetch_interval = refetch_interval
        self._timeout = timeout
        self._keys: dict[str, jwk.JWK] = {}
        self._last_fetch = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the JWKS unless one was fetched less than ``refetch_interval`` ago."""
        async with self._lock:
            now = time.monotonic()
            # With no keys at all (start-up, or the provider was down since), retry every second.
            interval = self._refetch_interval if self._keys else min(1.0, self._refetch_interval)
            if not force and now - self._last_fetch < interval:
                return False
            self._last_fetch = now
            self.fetches += 1
            try:
                document = await asyncio.wait_for(self._fetch(), self._timeout)
            except Exception as exc:  # keep the old keys: an outage must not log everyone out
                # The embedded provider listens only once start-up is over: early misses are normal.
                log.log(logging.WARNING if self.fetches > 3 else logging.INFO, "JWKS fetch failed: %s", exc)
                return False
            keys: dict[str, jwk.JWK] = {}
            for entry in document.get("keys", []):
                if entry.get("kty") == "RSA" and entry.get("use", "sig") == "sig" and "kid" in entry:
                    keys[entry["kid"]] = jwk.JWK(**entry)
            if keys:
                self._keys = keys
            return True

    async def key_for(self, kid: str) -> jwk.JWK | None:
        key = self._keys.get(kid)
        if key is None and await self.refresh():
            key = self._keys.get(kid)
        return key


class TokenValidator:
    """Checks an access token and returns its claims, or raises 401 ``invalid_token``."""

    def __init__(self, settings: Settings, jwks: JwksCache) -> None:
        self._issuer = settings.issuer
        self._audiences = settings.audiences
        self._leeway = settings.token_leeway
        self._jwks = jwks

    async def validate(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES:
            raise invalid_token("token too large")
        if token.count(".") != 2 or "{" in token:  # compact serialisation only, as Bearer tokens are
            raise invalid_token("malformed")
        try:
            signed = jws.JWS()
            signed.deserialize(token)
            header = signed.jose_header
        except (JWException, ValueError, TypeError, KeyError) as exc:
            raise invalid_token("malformed") from exc
        if isinstance(header, list) or header.get("alg") != "RS256":
            raise invalid_token("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise invalid_token("no key id")
        key = await self._jwks.key_for(kid)
        if key is None and not self._jwks.loaded:
            # Start-up (or an identity provider down since start): the token may well be valid;
            # a 401 would make its client throw it away. Ask it to come back instead.
            raise identity_unavailable("the identity provider's signing keys are not loaded yet", retry_after=1)
        if key is None:
            raise invalid_token("unknown signing key")
        try:
            signed.allowed_algs = ["RS256"]
            signed.verify(key, alg="RS256")
            claims = json.loads(signed.payload)
        except (JWException, ValueError, TypeError) as exc:
            raise invalid_token("bad signature") from exc
        if not isinstance(claims, dict):
            raise invalid_token("claims are not an object")
        self._check_claims(claims)
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)):
            raise invalid_token("no expiry")
        if exp + self._leeway < now:
            raise invalid_token("expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, (int, float)) or nbf - self._leeway > now):
            raise invalid_token("not valid yet")
        if claims.get("iss") != self._issuer:
            raise invalid_token("wrong issuer")
        if claims.get("typ") != "Bearer":
            raise invalid_token("not an access token")
        aud = claims.get("aud")
        audiences = {aud} if isinstance(aud, str) else set(aud or []) if isinstance(aud, list) else set()
        if not (audiences & self._audiences) and claims.get("azp") not in self._audiences:
            raise invalid_token("wrong audience")
        if not isinstance(claims.get("sub", claims.get("preferred_username")), str):
            raise invalid_token("no subject")


class Directory:
    """Teams from Keycloak groups, through python-keycloak's async admin API."""

    AGENT_TEAM_TTL = 30.0

    def __init__(self, settings: Settings) -> None:
        self._timeout = settings.identity_timeout
        self._agent_teams: dict[str, tuple[float, str | None]] = {}
        server = settings.keycloak_url or settings.base_url
        connection = KeycloakOpenIDConnection(
            server_url=server.rstrip("/") + "/",
            realm_name=settings.realm,
            user_realm_name=settings.realm,
            client_id=settings.admin_client_id,
            client_secret_key=settings.admin_client_secret,
            timeout=max(1, int(settings.identity_timeout)),
        )
        self._admin = KeycloakAdmin(connection=connection)
        self._openid = KeycloakOpenID(
            server_url=server.rstrip("/") + "/",
            realm_name=settings.realm,
            client_id=settings.admin_client_id,
            timeout=max(1, int(settings.identity_timeout)),
        )

    async def certs(self) -> dict[str, Any]:
        return await self._openid.a_certs()

    async def aclose(self) -> None:
        """Close the HTTP clients of both python-keycloak connections."""
        for connection in (self._admin.connection, self._openid.connection):
            try:
                await connection.aclose()
            except Exception:  # closing must never fail a shutdown
                log.debug("closing an identity client failed", exc_info=True)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self._timeout)
        except TimeoutError as exc:
            raise identity_unavailable("identity provider did not answer in time") from exc
        except GatewayError:
            raise
        except Exception as exc:
            log.warning("identity lookup failed: %r", exc)
            raise identity_unavailable() from exc

    async def groups(self) -> list[tuple[str, dict[str, list[str]]]]:
        """Every group (sub-groups flattened) with its attributes."""
        found = await self._call(self._admin.a_get_groups(query={"briefRepresentation": False}))
        flat: list[tuple[str, dict[str, list[str]]]] = []
        stack = list(found)
        while stack:
            group = stack.pop()
            flat.append((group.get("name", ""), group.get("attributes") or {}))
            stack.extend(group.get("subGroups") or [])
        return flat

    async def supervisor_teams(self, username: str) -> frozenset[str]:
        return rules.supervisor_teams(username, await self.groups())

    async def member_teams(self, username: str) -> frozenset[str]:
        user_id = await self._call(self._admin.a_get_user_id(username))
        if user_id is None:
            return frozenset()
        groups = await self._call(self._admin.a_get_user_groups(user_id, brief_representation=True))
        return frozenset(g.get("name", "") for g in groups)

    async def agent_team(self, username: str) -> str | None:
        """The agent's team group, cached briefly: platforms create conversations in bursts."""
        now = time.monotonic()
        cached = self._agent_teams.get(username)
        if cached is not None and now - cached[0] < self.AGENT_TEAM_TTL:
            return cached[1]
        teams = sorted(await self.member_teams(username))
        team = teams[0] if teams else None
        self._agent_teams[username] = (now, team)
        return team


#: A login session's (roles, teams) as resolved at its first request.
Rights = tuple[frozenset[str], frozenset[str]]


class SessionRights(Protocol):
    """Where the rights of each login session are kept (R2): in this process
    (:class:`MemorySessionRights`) or shared by every instance and across restarts
    (``gateway.shared.sessions.RedisSessionRights``)."""

    async def get(self, key: str) -> Rights | None: ...

    async def put_first(self, key: str, rights: Rights) -> Rights:
        """Keep ``rights`` for ``key`` unless some were kept already; answer the kept ones
        (two instances resolving one new session at once agree on the first)."""
        ...


class MemorySessionRights:
    """The most recent ``max_sessions`` sessions, in this process (a restart re-resolves)."""

    def __init__(self, max_sessions: int = 50_000) -> None:
        self._sessions: OrderedDict[str, Rights] = OrderedDict()
        self._max_sessions = max_sessions

    def cached(self, key: str) -> Rights | None:
        rights = self._sessions.get(key)
        if rights is not None:
            self._sessions.move_to_end(key)
        return rights

    async def get(self, key: str) -> Rights | None:
        return self.cached(key)

    async def put_first(self, key: str, rights: Rights) -> Rights:
        kept = self._sessions.setdefault(key, rights)
        if len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return kept


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, with teams cached per login session."""

    def __init__(self, validator: TokenValidator, directory: Directory, rights: SessionRights | None = None) -> None:
        self._validator = validator
        self._directory = directory
        self._rights = rights if rights is not None else MemorySessionRights()

    async def authenticate(self, token: str) -> Principal:
        claims = await self._validator.validate(token)
        roles = frozenset(r for r in (claims.get("realm_access") or {}).get("roles", []) if isinstance(r, str))
        username = str(claims.get("preferred_username") or claims.get("sub"))
        subject = str(claims.get("sub") or username)
        # Keycloak puts the login session in ``sid``; fall back to the issue time so that a
        # token without one still gets exactly one team resolution.
        session = str(claims.get("sid") or claims.get("session_state") or f"{subject}@{claims.get('iat')}")
        roles, teams = await self._session_rights(f"{subject}|{session}", username, roles)
        return Principal(
            username=username,
            subject=subject,
            roles=roles,
            session=session,
            expires_at=float(claims["exp"]),
            client=str(claims.get("azp", "")),
            teams=teams,
        )

    async def _session_rights(
        self, key: str, username: str, roles: frozenset[str]
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Roles and teams as they were at the first request of this login session (R2): a
        token refreshed within the session keeps them even if Keycloak changed since."""
        cached = await self._rights.get(key)
        if cached is not None:
            return cached
        teams = await self._directory.supervisor_teams(username) if "supervisor" in roles else frozenset()
        return await self._rights.put_first(key, (roles, teams))
