"""Tokens and login sessions of the embedded provider, shaped like Keycloak 26's.

Access token claims (user login) as Keycloak 26.4 issues them for the ``cx`` realm::

    exp iat jti iss aud sub typ=Bearer azp sid acr allowed-origins realm_access{roles}
    [resource_access] scope email_verified name preferred_username given_name family_name email

A client-credentials token has no ``sid`` (Keycloak 26 keeps no session for it) and its
``preferred_username`` is ``service-account-<clientId>``. Refresh tokens are RS256 here (HS512 in
Keycloak: opaque to clients either way), ``typ=Refresh``, ``aud`` = the issuer.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jwcrypto import jwk, jws
from jwcrypto.common import JWException, json_decode

from .realm import Client, Realm, User

log = logging.getLogger("devtools.idp")

#: Client scopes Keycloak attaches by default (the token's ``scope`` shows the ones with claims).
DEFAULT_SCOPES = ("profile", "email")


class TokenError(Exception):
    """A token failed verification; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Session:
    """A login session (``sid``): what a refresh, userinfo and logout refer to."""

    id: str
    user_id: str
    client_id: str
    started: int
    last_refresh: int
    scope: str
    nonce: str | None = None


@dataclass
class TokenService:
    realm: Realm
    key: jwk.JWK
    issuer: str
    sessions: dict[str, Session] = field(default_factory=dict)
    #: Sessions ended by logout (sid -> when its refresh tokens expire anyway). Kept in
    #: ``ended_path`` so a refresh token of a logged-out session stays refused after a restart
    #: (a restart otherwise rebuilds sessions from refresh tokens, see :meth:`session_for`).
    ended: dict[str, int] = field(default_factory=dict)
    ended_path: Path | None = None

    def __post_init__(self) -> None:
        if self.ended_path is not None and self.ended_path.exists():
            try:
                data = json.loads(self.ended_path.read_text(encoding="utf-8"))
                now = int(time.time())
                self.ended = {str(k): int(v) for k, v in data.items() if int(v) > now}
            except (OSError, ValueError, TypeError, AttributeError):
                log.warning("ignoring unreadable %s", self.ended_path)

    @property
    def kid(self) -> str:
        return str(self.key.get("kid") or self.key.thumbprint())

    # --- signing --------------------------------------------------------------------------
    def sign(self, claims: dict[str, Any]) -> str:
        token = jws.JWS(json.dumps(claims, separators=(",", ":")).encode())
        token.add_signature(self.key, alg="RS256", protected={"alg": "RS256", "typ": "JWT", "kid": self.kid})
        return str(token.serialize(compact=True))

    def verify(self, token: str, typ: str, leeway: int = 0, check_exp: bool = True) -> dict[str, Any]:
        """Check signature, ``iss``, ``exp`` (unless ``check_exp`` is false) and ``typ``."""
        if not isinstance(token, str) or not token or len(token) > 16384 or token.count(".") != 2:
            raise TokenError("malformed token")
        try:
            obj = jws.JWS()
            obj.deserialize(token)
            header = obj.jose_header
            if header.get("alg") != "RS256" or header.get("kid") not in (None, self.kid):
                raise TokenError("unknown key")
            obj.verify(self.key, alg="RS256")
            claims = json_decode(obj.payload)
        except TokenError:
            raise
        except (JWException, ValueError, TypeError, KeyError):
            raise TokenError("signature verification failed") from None
        if not isinstance(claims, dict):
            raise TokenError("malformed token")
        if claims.get("iss") != self.issuer:
            raise TokenError("wrong issuer")
        exp = claims.get("exp")
        if not isinstance(exp, int) or (check_exp and exp + leeway < time.time()):
            raise TokenError("token expired")
        if claims.get("typ") != typ:
            raise TokenError(f"not a {typ} token")
        return claims

    # --- sessions -------------------------------------------------------------------------
    def start_session(self, user: User, client: Client, scope: str, nonce: str | None = None) -> Session:
        now = int(time.time())
        session = Session(str(uuid.uuid4()), user.id, client.client_id, now, now, scope, nonce)
        self._prune(now)
        self.sessions[session.id] = session
        return session

    def end_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        now = int(time.time())
        started = session.started if session else now
        self.ended[sid] = max(started + self.realm.sso_session_max, now + self.realm.sso_session_idle)
        self.ended = {k: v for k, v in self.ended.items() if v > now}
        if self.ended_path is not None:
            tmp = self.ended_path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(self.ended), encoding="utf-8")
                os.replace(tmp, self.ended_path)
            except OSError:
                log.exception("could not record the logout in %s", self.ended_path)

    def session_for(self, claims: dict[str, Any]) -> Session | None:
        """The live session a token names, re-created from a refresh token after a restart."""
        sid = claims.get("sid")
        if not isinstance(sid, str) or sid in self.ended:
            return None
        session = self.sessions.get(sid)
        now = int(time.time())
        if session is None and claims.get("typ") == "Refresh":
            started = claims.get("sess_start")
            if not isinstance(started, int):
                return None
            session = Session(
                sid,
                str(claims.get("sub")),
                str(claims.get("azp")),
                started,
                now,
                str(claims.get("scope", "")),
            )
            self.sessions[sid] = session
        if session is None:
            return None
        if (
            now > session.started + self.realm.sso_session_max
            or now > session.last_refresh + self.realm.sso_session_idle
        ):
            self.end_session(sid)
            return None
        return session

    def _prune(self, now: int) -> None:
        if len(self.sessions) < 1000:
            return
        for sid, s in list(self.sessions.items()):
            if now > s.last_refresh + self.realm.sso_session_idle or now > s.started + self.realm.sso_session_max:
                del self.sessions[sid]

    # --- issuing --------------------------------------------------------------------------
    def _base(self, now: int, prefix: str) -> dict[str, Any]:
        return {"exp": 0, "iat": now, "jti": f"{prefix}:{uuid.uuid4()}", "iss": self.issuer}

    def access_claims(
        self, user: User, client: Client, scope: str, session: Session | None, now: int
    ) -> dict[str, Any]:
        realm_roles, client_roles = self.realm.effective_roles(user)
        audiences = list(client.audiences)
        # Like Keycloak: every other client the user holds roles of becomes an audience.
        for cid, roles in client_roles.items():
            if roles and cid != client.client_id and cid not in audiences:
                audiences.append(cid)
        claims = self._base(now, "onrtro" if session else "trrtcc")
        claims["exp"] = now + self.realm.access_token_lifespan
        if audiences:
            claims["aud"] = audiences[0] if len(audiences) == 1 else audiences
        claims.update(sub=user.id, typ="Bearer", azp=client.client_id)
        if session is not None:
            claims["sid"] = session.id
        claims["acr"] = "1"
        origins = self._allowed_origins(client)
        if origins:
            claims["allowed-origins"] = origins
        if realm_roles:
            claims["realm_access"] = {"roles": realm_roles}
        resource = {cid: {"roles": roles} for cid, roles in client_roles.items() if roles}
        if resource:
            claims["resource_access"] = resource
        claims["scope"] = scope
        claims.update(self._profile(user))
        return claims

    def _profile(self, user: User) -> dict[str, Any]:
        out: dict[str, Any] = {"email_verified": user.email_verified}
        if user.full_name:
            out["name"] = user.full_name
        out["preferred_username"] = user.username
        if user.first_name:
            out["given_name"] = user.first_name
        if user.last_name:
            out["family_name"] = user.last_name
        if user.email:
            out["email"] = user.email
        return out

    def userinfo(self, user: User) -> dict[str, Any]:
        return {"sub": user.id, **self._profile(user)}

    @staticmethod
    def _allowed_origins(client: Client) -> list[str]:
        origins: list[str] = []
        for origin in client.web_origins:
            if origin == "+":
                # "+" means: the origins of the redirect URIs, as Keycloak derives them.
                for uri in client.redirect_uris:
                    scheme, sep, rest = uri.partition("://")
                    if sep and rest:
                        o = f"{scheme}://{rest.split('/', 1)[0]}"
                        if o not in origins:
                            origins.append(o)
            elif origin not in origins:
                origins.append(origin)
        return origins

    def token_response(
        self,
        user: User,
        client: Client,
        requested_scope: str = "",
        session: Session | None = None,
        with_refresh: bool = True,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        """The token endpoint's JSON answer for a user (or service-account) grant."""
        now = int(time.time())
        openid = "openid" in requested_scope.split()
        scope_list = (["openid"] if openid else []) + list(DEFAULT_SCOPES)
        scope = " ".join(scope_list)
        access = self.access_claims(user, client, scope, session, now)
        body: dict[str, Any] = {
            "access_token": self.sign(access),
            "expires_in": self.realm.access_token_lifespan,
            "refresh_expires_in": 0,
            "token_type": "Bearer",
        }
        if session is not None and openid:
            id_claims = self._base(now, "onrtid")
            id_claims["exp"] = access["exp"]
            id_claims.update(aud=client.client_id, sub=user.id, typ="ID", azp=client.client_id)
            if nonce or session.nonce:
                id_claims["nonce"] = nonce or session.nonce
            id_claims.update(sid=session.id, acr="1", **self._profile(user))
            body["id_token"] = self.sign(id_claims)
        if session is not None and with_refresh:
            session.last_refresh = now
            refresh_exp = min(now + self.realm.sso_session_idle, session.started + self.realm.sso_session_max)
            refresh = self._base(now, "")
            refresh["jti"] = str(uuid.uuid4())
            refresh.update(
                exp=refresh_exp,
                aud=self.issuer,
                sub=user.id,
                typ="Refresh",
                azp=client.client_id,
                sid=session.id,
                scope=scope,
                sess_start=session.started,
            )
            body["refresh_token"] = self.sign(refresh)
            body["refresh_expires_in"] = refresh_exp - now
        body["not-before-policy"] = 0
        if session is not None:
            body["session_state"] = session.id
        body["scope"] = scope
        return body


def new_code() -> str:
    return secrets.token_urlsafe(32)
