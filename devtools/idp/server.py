"""aiohttp routes of the embedded identity provider, on Keycloak's paths.

Served on the gateway's own origin so that the gateway, its console and the tests talk to it
exactly as they would to Keycloak (python-keycloak included). Answers and error bodies copy
Keycloak 26.4's (``{"error": "invalid_grant", "error_description": ...}`` on the token
endpoint; ``{"error": "HTTP 401 Unauthorized"}`` on the admin API).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from aiohttp import web

from gateway.config import Settings

from .keys import load_or_create_key, public_jwks
from .realm import Client, Group, Realm, RealmError, User, _uri_matches, load_realm
from .tokens import TokenError, TokenService, new_code

log = logging.getLogger("devtools.idp")

_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_MAX_PARAM = 4096
_CODE_TTL = 60


@dataclass
class _Code:
    client_id: str
    user_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    challenge: str
    expires: float


@dataclass
class EmbeddedIdp:
    """State of the embedded provider: the realm, its key, sessions and pending codes."""

    settings: Settings
    realm: Realm
    tokens: TokenService
    codes: dict[str, _Code] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedIdp:
        realm = load_realm(settings.realm_file)
        if realm.name != settings.realm:
            raise RealmError(f"{settings.realm_file} holds realm {realm.name!r}, settings ask for {settings.realm!r}")
        key = load_or_create_key(settings.data_dir)
        ended = Path(settings.data_dir) / "idp-ended-sessions.json"
        return cls(settings, realm, TokenService(realm, key, settings.issuer, ended_path=ended))

    @property
    def issuer(self) -> str:
        return self.tokens.issuer


IDP_KEY: web.AppKey[EmbeddedIdp] = web.AppKey("embedded_idp", EmbeddedIdp)


class OAuthError(Exception):
    """An OAuth error answer (token, userinfo, logout endpoints)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.error, "error_description": self.description},
            status=self.status,
            headers=_NO_STORE,
        )


def _admin_error(status: int, message: str | None = None) -> web.Response:
    default = {401: "HTTP 401 Unauthorized", 403: "HTTP 403 Forbidden", 404: "HTTP 404 Not Found"}
    return web.json_response({"error": message or default.get(status, "error")}, status=status)


# --- helpers --------------------------------------------------------------------------------
def _idp(request: web.Request) -> EmbeddedIdp:
    idp = request.app[IDP_KEY]
    if request.match_info.get("realm") != idp.realm.name:
        raise web.HTTPNotFound(text='{"error":"Realm does not exist"}', content_type="application/json")
    return idp


async def _form(request: web.Request) -> dict[str, str]:
    """The urlencoded form (query parameters are not accepted on POST, as in Keycloak)."""
    if request.method != "POST":
        return {}
    if request.content_type != _FORM:
        return {}
    try:
        data = await request.post()
    except (ValueError, UnicodeDecodeError):
        raise OAuthError(400, "invalid_request", "Malformed form") from None
    out: dict[str, str] = {}
    for k, v in data.items():
        if not isinstance(v, str) or len(v) > _MAX_PARAM:
            raise OAuthError(400, "invalid_request", f"Invalid parameter: {k}")
        out.setdefault(k, v)
    return out


def _basic_auth(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header[:6].lower() == "basic ":
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError(400, "invalid_request", "Invalid Authorization header") from None
    cid, sep, secret = raw.partition(":")
    if not sep:
        raise OAuthError(400, "invalid_request", "Invalid Authorization header")
    # RFC 6749 §2.3.1: both parts are form-urlencoded inside Basic.
    return unquote(cid.replace("+", " ")), unquote(secret.replace("+", " "))


def _authenticate_client(idp: EmbeddedIdp, request: web.Request, form: dict[str, str]) -> Client:
    basic = _basic_auth(request)
    client_id, secret = basic if basic else (form.get("client_id", ""), form.get("client_secret"))
    if basic and form.get("client_id") not in (None, client_id):
        raise OAuthError(400, "invalid_request", "Mismatched client_id")
    client = idp.realm.clients.get(client_id) if client_id else None
    if client is None or not client.enabled or client.bearer_only:
        raise OAuthError(401, "invalid_client", "Invalid client or Invalid client credentials")
    if not client.public and (secret is None or not client.check_secret(secret)):
        raise OAuthError(401, "unauthorized_client", "Invalid client or Invalid client credentials")
    return client


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


def _login_user(idp: EmbeddedIdp, username: str, password: str) -> User:
    user = idp.realm.user_by_login(username) if 0 < len(username) <= 255 else None
    if user is None or user.service_account_client or not user.check_password(password):
        raise OAuthError(401, "invalid_grant", "Invalid user credentials")
    if not user.enabled:
        raise OAuthError(400, "invalid_grant", "Account disabled")
    if user.required_actions:
        raise OAuthError(400, "invalid_grant", "Account is not fully set up")
    return user


# --- OpenID Connect endpoints ---------------------------------------------------------------
async def well_known(request: web.Request) -> web.Response:
    idp = _idp(request)
    base = f"{idp.issuer}/protocol/openid-connect"
    return web.json_response(
        {
            "issuer": idp.issuer,
            "authorization_endpoint": f"{base}/auth",
            "token_endpoint": f"{base}/token",
            "userinfo_endpoint": f"{base}/userinfo",
            "end_session_endpoint": f"{base}/logout",
            "jwks_uri": f"{base}/certs",
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "password",
                "client_credentials",
            ],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "userinfo_signing_alg_values_supported": ["none"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email"],
            "claims_supported": [
                "aud",
                "sub",
                "iss",
                "auth_time",
                "name",
                "given_name",
                "family_name",
                "preferred_username",
                "email",
                "email_verified",
                "acr",
                "azp",
                "sid",
            ],
            "frontchannel_logout_supported": False,
            "backchannel_logout_supported": False,
        }
    )


async def certs(request: web.Request) -> web.Response:
    idp = _idp(request)
    return web.json_response(public_jwks(idp.tokens.key))


async def token(request: web.Request) -> web.Response:
    idp = _idp(request)
    try:
        form = await _form(request)
        grant = form.get("grant_type")
        if not grant:
            raise OAuthError(400, "invalid_request", "Missing form parameter: grant_type")
        handler = _GRANTS.get(grant)
        if handler is None:
            raise OAuthError(400, "unsupported_grant_type", "Unsupported grant_type")
        client = _authenticate_client(idp, request, form)
        body = handler(idp, client, form)
    except OAuthError as exc:
        log.info("token request refused: %s (%s)", exc.error, exc.description)
        return exc.response()
    return web.json_response(body, headers=_NO_STORE)


def _grant_password(idp: EmbeddedIdp, client: Client, form: dict[str, str]) -> dict[str, Any]:
    if not client.direct_access_grants:
        raise OAuthError(400, "unauthorized_client", "Client not allowed for direct access grants")
    user = _login_user(idp, form.get("username", ""), form.get("password", ""))
    scope = form.get("scope", "")
    session = idp.tokens.start_session(user, client, scope)
    return idp.tokens.token_response(user, client, scope, session)


def _grant_client_credentials(idp: EmbeddedIdp, client: Client, form: dict[str, str]) -> dict[str, Any]:
    if client.public:
        raise OAuthError(401, "unauthorized_client", "Public client not allowed to retrieve service account")
    if not client.service_accounts:
        raise OAuthError(400, "unauthorized_client", "Client not enabled to retrieve service account")
    user = idp.realm.service_account(client.client_id)
    if user is None or not user.enabled:
        raise OAuthError(400, "invalid_request", "Service account user not found or disabled")
    # Keycloak 26 keeps no session for client credentials: no sid, no refresh token.
    return idp.tokens.token_response(user, client, form.get("scope", ""), None)


def _grant_refresh(idp: EmbeddedIdp, client: Client, form: dict[str, str]) -> dict[str, Any]:
    raw = form.get("refresh_token")
    if not raw:
        raise OAuthError(400, "invalid_request", "Missing parameter: refresh_token")
    try:
        claims = idp.tokens.verify(raw, "Refresh")
    except TokenError as exc:
        reason = "Token is not active" if exc.reason == "token expired" else "Invalid refresh token"
        raise OAuthError(400, "invalid_grant", reason) from None
    if claims.get("azp") != client.client_id:
        raise OAuthError(400, "invalid_grant", "Invalid refresh token. Token client and authorized client don't match")
    session = idp.tokens.session_for(claims)
    user = idp.realm.users.get(str(claims.get("sub")))
    if session is None or user is None:
        raise OAuthError(400, "invalid_grant", "Session not active")
    if not user.enabled:
        raise OAuthError(400, "invalid_grant", "User disabled")
    # Roles are re-read from the realm, as Keycloak does on refresh.
    return idp.tokens.token_response(user, client, session.scope, session)


def _grant_code(idp: EmbeddedIdp, client: Client, form: dict[str, str]) -> dict[str, Any]:
    code = idp.codes.pop(form.get("code", ""), None)
    if code is None or code.expires < time.time() or code.client_id != client.client_id:
        raise OAuthError(400, "invalid_grant", "Code not valid")
    if form.get("redirect_uri") != code.redirect_uri:
        raise OAuthError(400, "invalid_grant", "Incorrect redirect_uri")
    if code.challenge:
        verifier = form.get("code_verifier", "")
        if not verifier:
            raise OAuthError(400, "invalid_grant", "PKCE code verifier not specified")
        digest = hashlib.sha256(verifier.encode()).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if not hmac.compare_digest(computed, code.challenge):
            raise OAuthError(400, "invalid_grant", "PKCE verification failed: Code mismatch")
    user = idp.realm.users.get(code.user_id)
    if user is None or not user.enabled:
        raise OAuthError(400, "invalid_grant", "User disabled")
    session = idp.tokens.start_session(user, client, code.scope, code.nonce)
    return idp.tokens.token_response(user, client, code.scope, session, nonce=code.nonce)


_GRANTS: dict[str, Callable[[EmbeddedIdp, Client, dict[str, str]], dict[str, Any]]] = {
    "password": _grant_password,
    "client_credentials": _grant_client_credentials,
    "refresh_token": _grant_refresh,
    "authorization_code": _grant_code,
}


async def userinfo(request: web.Request) -> web.Response:
    idp = _idp(request)
    raw = _bearer(request)
    if raw is None:
        try:
            raw = (await _form(request)).get("access_token")
        except OAuthError as exc:
            return exc.response()
    challenge = f'Bearer realm="{idp.realm.name}", error="invalid_token", error_description="Token verification failed"'
    if not raw:
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})
    try:
        claims = idp.tokens.verify(raw, "Bearer")
    except TokenError:
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})
    if "sid" in claims and idp.tokens.session_for(claims) is None:
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})
    if "openid" not in str(claims.get("scope", "")).split():
        # Keycloak 26 answers 403 without a body for a token lacking the openid scope.
        return web.Response(
            status=403,
            headers={
                "WWW-Authenticate": f'Bearer realm="{idp.realm.name}", error="insufficient_scope", error_description="Missing openid scope"'
            },
        )
    user = idp.realm.users.get(str(claims.get("sub")))
    if user is None or not user.enabled:
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})
    return web.json_response(idp.tokens.userinfo(user), headers=_NO_STORE)


async def logout(request: web.Request) -> web.StreamResponse:
    idp = _idp(request)
    try:
        form = await _form(request)
        if request.method == "POST" and "refresh_token" in form:
            # Back-channel logout by the client (what python-keycloak's logout() does).
            client = _authenticate_client(idp, request, form)
            try:
                claims = idp.tokens.verify(form["refresh_token"], "Refresh")
            except TokenError:
                raise OAuthError(400, "invalid_grant", "Invalid refresh token") from None
            if claims.get("azp") != client.client_id:
                raise OAuthError(400, "invalid_grant", "Invalid refresh token")
            idp.tokens.end_session(str(claims.get("sid")))
            return web.Response(status=204, headers=_NO_STORE)
        params = {**request.query, **form}
        hint = params.get("id_token_hint")
        if not hint:
            raise OAuthError(400, "invalid_request", "Missing parameters: id_token_hint")
        try:
            claims = idp.tokens.verify(str(hint), "ID", check_exp=False)
        except TokenError:
            raise OAuthError(400, "invalid_request", "Invalid id_token_hint") from None
        idp.tokens.end_session(str(claims.get("sid")))
        redirect = params.get("post_logout_redirect_uri")
        logout_client = idp.realm.clients.get(str(claims.get("azp")))
        if redirect and logout_client is not None:
            allowed = (
                logout_client.redirect_allowed(redirect)
                if "+" in logout_client.post_logout_redirect_uris
                else any(
                    redirect == p or (p.endswith("*") and redirect.startswith(p[:-1]))
                    for p in logout_client.post_logout_redirect_uris
                )
            )
            if not allowed:
                raise OAuthError(400, "invalid_redirect_uri", "Invalid redirect uri")
            state = params.get("state")
            target = redirect + (("&" if "?" in redirect else "?") + urlencode({"state": state}) if state else "")
            raise web.HTTPFound(target)
        return web.Response(
            text="<!doctype html><title>Logged out</title><p>You are logged out.</p>", content_type="text/html"
        )
    except OAuthError as exc:
        return exc.response()


_LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in to {realm}</title></head>
<body><h1>Sign in to {realm}</h1>{error}
<form method="post" action="">
{hidden}
<label>Username <input name="username" autocomplete="username" autofocus required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></body></html>"""

_AUTH_PARAMS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
)


async def authorize(request: web.Request) -> web.StreamResponse:
    """Authorization-code flow with PKCE (S256): a plain login form, then a redirect with code."""
    idp = _idp(request)
    try:
        form = await _form(request)
    except OAuthError as exc:
        return exc.response()
    params = {k: request.query[k] for k in _AUTH_PARAMS if k in request.query}
    params.update({k: form[k] for k in _AUTH_PARAMS if k in form})
    if any(len(v) > _MAX_PARAM for v in params.values()):
        return web.Response(status=400, text="Invalid parameter")
    client = idp.realm.clients.get(params.get("client_id", ""))
    redirect = params.get("redirect_uri", "")
    if client is None or not client.enabled or not client.standard_flow:
        return web.Response(status=400, text="Client not found or not allowed to use this flow.")
    if not client.redirect_allowed(redirect):
        return web.Response(status=400, text="Invalid parameter: redirect_uri")

    def back(**extra: str) -> web.HTTPFound:
        query = dict(extra)
        if "state" in params:
            query["state"] = params["state"]
        return web.HTTPFound(redirect + ("&" if "?" in redirect else "?") + urlencode(query))

    if params.get("response_type") != "code":
        raise back(error="unsupported_response_type", error_description="Only code is supported")
    challenge = params.get("code_challenge", "")
    method = params.get("code_challenge_method", "")
    if (client.pkce_method or challenge) and (method != "S256" or not 43 <= len(challenge) <= 128):
        raise back(error="invalid_request", error_description="Missing or invalid parameter: code_challenge (S256)")

    error = ""
    if request.method == "POST" and "username" in form:
        try:
            user = _login_user(idp, form.get("username", ""), form.get("password", ""))
        except OAuthError:
            error = "<p role=alert>Invalid username or password.</p>"
        else:
            code = new_code()
            now = time.time()
            for k in [k for k, c in idp.codes.items() if c.expires < now]:
                del idp.codes[k]
            idp.codes[code] = _Code(
                client.client_id,
                user.id,
                redirect,
                params.get("scope", ""),
                params.get("nonce"),
                challenge,
                now + _CODE_TTL,
            )
            raise back(code=code)
    hidden = "\n".join(
        f'<input type="hidden" name="{k}" value="{html.escape(v, quote=True)}">' for k, v in params.items()
    )
    page = _LOGIN_PAGE.format(realm=html.escape(idp.realm.name), error=error, hidden=hidden)
    return web.Response(
        text=page,
        content_type="text/html",
        status=200 if not error else 401,
        headers={"X-Frame-Options": "DENY", "Cache-Control": "no-store"},
    )


# --- admin API (the part the gateway uses) ------------------------------------------------------
_VIEW_GROUPS = {"query-groups", "view-users", "manage-users"}
_VIEW_USERS = {"view-users", "manage-users"}
_QUERY_USERS = {"query-users", "view-users", "manage-users"}
_MANAGE_USERS = {"manage-users"}

AdminHandler = Callable[[web.Request, EmbeddedIdp], Awaitable[web.StreamResponse]]


def _admin(roles: set[str]) -> Callable[[AdminHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Require a bearer token whose subject currently holds one of ``roles`` of realm-management."""

    def wrap(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            idp = _idp(request)
            raw = _bearer(request)
            if raw is None:
                return _admin_error(401)
            try:
                claims = idp.tokens.verify(raw, "Bearer")
            except TokenError:
                return _admin_error(401)
            if "sid" in claims and idp.tokens.session_for(claims) is None:
                return _admin_error(401)
            user = idp.realm.users.get(str(claims.get("sub")))
            if user is None or not user.enabled:
                return _admin_error(401)
            _, client_roles = idp.realm.effective_roles(user)
            if not roles & set(client_roles.get("realm-management", [])):
                return _admin_error(403)
            try:
                return await handler(request, idp)
            except _BadQuery as exc:
                return web.json_response({"error": str(exc)}, status=400)

        return run

    return wrap


class _BadQuery(ValueError):
    pass


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise _BadQuery(f"Invalid value for {name}")


def _page(request: web.Request, items: list[Any]) -> list[Any]:
    try:
        first = int(request.query.get("first", "0") or 0)
        maximum = int(request.query.get("max", "-1") or -1)
    except ValueError:
        raise _BadQuery("first and max must be integers") from None
    first = max(first, 0)
    return items[first:] if maximum < 0 else items[first : first + maximum]


@_admin(_VIEW_GROUPS)
async def admin_groups(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    brief = _flag(request, "briefRepresentation", True)
    exact = _flag(request, "exact", False)
    search = request.query.get("search")
    groups: list[Group] = list(idp.realm.groups)
    if search:
        needle = search.lower()
        groups = [
            g for g in idp.realm.all_groups() if (g.name.lower() == needle if exact else needle in g.name.lower())
        ]
    query = request.query.get("q")
    if query:
        for term in query.split(" "):
            key, _, value = term.partition(":")
            groups = [g for g in groups if value in g.attributes.get(key, [])]
    return web.json_response([g.representation(brief) for g in _page(request, groups)])


@_admin(_VIEW_USERS)
async def admin_group(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    group = idp.realm.group(request.match_info["id"])
    if group is None:
        return _admin_error(404, "Could not find group by id")
    return web.json_response(group.representation(brief=False))


@_admin(_MANAGE_USERS)
async def admin_update_group(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    group = idp.realm.group(request.match_info["id"])
    if group is None:
        return _admin_error(404, "Could not find group by id")
    if request.content_type != "application/json":
        return web.json_response({"error": "HTTP 415 Unsupported Media Type"}, status=415)
    try:
        rep = await request.json()
    except ValueError:
        return web.json_response({"error": "unknown_error"}, status=400)
    if not isinstance(rep, dict):
        return web.json_response({"error": "unknown_error"}, status=400)
    try:
        idp.realm.update_group(group, rep)
    except RealmError as exc:
        status = 409 if "already exists" in str(exc) else 400
        return web.json_response({"error": str(exc)}, status=status)
    log.info("group %s updated through the admin API", group.path)
    return web.Response(status=204)


@_admin(_QUERY_USERS)
async def admin_users(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    brief = _flag(request, "briefRepresentation", True)
    exact = _flag(request, "exact", False)
    users = list(idp.realm.users.values())
    filters: dict[str, Callable[[User], str]] = {
        "username": lambda u: u.username,
        "email": lambda u: u.email,
        "firstName": lambda u: u.first_name,
        "lastName": lambda u: u.last_name,
    }
    used = False
    for name, get in filters.items():
        wanted = request.query.get(name)
        if wanted is None:
            continue
        used = True
        w = wanted.lower()
        users = [u for u in users if (get(u).lower() == w if exact else w in get(u).lower())]
    search = request.query.get("search")
    if search is not None:
        used = True
        needle = search.lower().strip("*")
        users = [
            u
            for u in users
            if not u.service_account_client and any(f(u).lower().startswith(needle) for f in filters.values())
        ]
    if not (used and exact):
        # Keycloak hides service-account users from listings unless asked for exactly.
        users = [u for u in users if not u.service_account_client]
    enabled = request.query.get("enabled")
    if enabled is not None:
        users = [u for u in users if u.enabled == (enabled.lower() == "true")]
    users.sort(key=lambda u: u.username)
    return web.json_response([u.representation(brief) for u in _page(request, users)])


@_admin(_VIEW_USERS)
async def admin_user(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    user = idp.realm.users.get(request.match_info["id"])
    if user is None:
        return _admin_error(404, "User not found")
    return web.json_response(user.representation(brief=False))


@_admin(_VIEW_USERS)
async def admin_user_groups(request: web.Request, idp: EmbeddedIdp) -> web.Response:
    user = idp.realm.users.get(request.match_info["id"])
    if user is None:
        return _admin_error(404, "User not found")
    brief = _flag(request, "briefRepresentation", True)
    reps = []
    for group in idp.realm.user_groups(user):
        rep = group.representation(brief)
        for k in ("subGroupCount", "access"):
            rep.pop(k, None)
        reps.append(rep)
    return web.json_response(_page(request, reps))


def _origin_allowed(idp: EmbeddedIdp, origin: str) -> bool:
    """Whether some client of the realm lists ``origin`` in its web origins ("+": the origins of
    its redirect URIs, as Keycloak derives them; ``http://127.0.0.1:*`` any loopback port)."""
    for client in idp.realm.clients.values():
        for allowed in client.web_origins:
            patterns = [_origin_of(uri) for uri in client.redirect_uris] if allowed == "+" else [allowed]
            if any(_uri_matches(pattern, origin) for pattern in patterns):
                return True
    return False


def _origin_of(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if sep else ""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _cors(handler: Handler) -> Handler:
    """CORS on the endpoints a browser console calls, as Keycloak answers them: a console served
    by another origin (another gateway instance using this one's provider) signs in here."""

    async def run(request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        allowed = bool(origin) and _origin_allowed(_idp(request), origin)
        if request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=200 if allowed else 403)
            if allowed:
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
                response.headers["Access-Control-Max-Age"] = "600"
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if allowed:
                    exc.headers["Access-Control-Allow-Origin"] = origin
                    exc.headers["Access-Control-Allow-Credentials"] = "true"
                raise
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    return run


def add_idp_routes(app: web.Application, settings: Settings) -> EmbeddedIdp:
    """Serve the embedded provider for ``settings.realm`` on ``app`` (Keycloak's paths).

    Loads ``settings.realm_file`` and the signing key under ``settings.data_dir`` (creating it
    the first time) now, so a broken realm file fails the start-up, not the first login.
    Tokens carry ``iss = settings.issuer`` whatever Host header a request arrives with.
    The provider is stored as ``app[IDP_KEY]`` and returned.
    """
    idp = EmbeddedIdp.from_settings(settings)
    app[IDP_KEY] = idp
    oidc = "/realms/{realm}/protocol/openid-connect"
    admin = "/admin/realms/{realm}"
    app.router.add_get("/realms/{realm}/.well-known/openid-configuration", well_known)
    app.router.add_get(f"{oidc}/certs", certs)
    for name, handler in (("token", token), ("userinfo", userinfo), ("logout", logout)):
        methods = ("POST",) if name == "token" else ("GET", "POST")
        for method in (*methods, "OPTIONS"):
            app.router.add_route(method, f"{oidc}/{name}", _cors(handler))
    app.router.add_route("GET", f"{oidc}/auth", authorize)
    app.router.add_route("POST", f"{oidc}/auth", authorize)
    app.router.add_get(f"{admin}/groups", admin_groups)
    app.router.add_get(f"{admin}/groups/{{id}}", admin_group)
    app.router.add_put(f"{admin}/groups/{{id}}", admin_update_group)
    app.router.add_get(f"{admin}/users", admin_users)
    app.router.add_get(f"{admin}/users/{{id}}", admin_user)
    app.router.add_get(f"{admin}/users/{{id}}/groups", admin_user_groups)
    return idp
