"""A Keycloak realm export (``kc.sh export`` / ``--import-realm`` JSON) held in memory.

Only what the embedded provider needs is modelled: realm roles, groups (with attributes and
sub-groups), users (password credentials, realm and client role mappings, group paths, service
account link) and OpenID Connect clients (public/confidential, grants, redirect URIs and the
audiences added by ``oidc-audience-mapper``). Unknown fields are ignored so a real export
loads too. Changes made through the admin API live in memory only: a restart reloads the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Namespace for ids the export leaves out, so they are stable across restarts.
_ID_NAMESPACE = uuid.UUID("6f1c2e0a-3c1b-4f5e-9d3a-2b7c8e9f0a11")


class RealmError(ValueError):
    """The realm file can not be used."""


@dataclass
class Credential:
    """One password credential: plain ``value`` (as in hand-written imports) or a pbkdf2 hash."""

    value: str | None = None
    algorithm: str = ""
    iterations: int = 0
    salt: bytes = b""
    hashed: bytes = b""

    def matches(self, password: str) -> bool:
        if self.value is not None:
            return hmac.compare_digest(self.value.encode(), password.encode())
        digest = {"pbkdf2-sha256": "sha256", "pbkdf2-sha512": "sha512", "pbkdf2": "sha1"}.get(self.algorithm)
        if digest is None or not self.hashed or self.iterations <= 0:
            # argon2 (Keycloak's default since 24) needs a library we do not ship.
            return False
        candidate = hashlib.pbkdf2_hmac(digest, password.encode(), self.salt, self.iterations, len(self.hashed))
        return hmac.compare_digest(candidate, self.hashed)


@dataclass
class Group:
    id: str
    name: str
    path: str
    attributes: dict[str, list[str]] = field(default_factory=dict)
    realm_roles: list[str] = field(default_factory=list)
    client_roles: dict[str, list[str]] = field(default_factory=dict)
    parent_id: str | None = None
    children: list[Group] = field(default_factory=list)

    def representation(self, brief: bool) -> dict[str, Any]:
        """The group as Keycloak's admin API shows it (attributes only when not ``brief``)."""
        rep: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "path": self.path,
            "subGroupCount": len(self.children),
            "subGroups": [],
            "access": {
                "view": True,
                "viewMembers": True,
                "manageMembers": False,
                "manage": False,
                "manageMembership": False,
            },
        }
        if self.parent_id:
            rep["parentId"] = self.parent_id
        if not brief:
            rep["attributes"] = {k: list(v) for k, v in self.attributes.items()}
            rep["realmRoles"] = list(self.realm_roles)
            rep["clientRoles"] = {k: list(v) for k, v in self.client_roles.items()}
        return rep


@dataclass
class User:
    id: str
    username: str
    enabled: bool = True
    email: str = ""
    email_verified: bool = False
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, list[str]] = field(default_factory=dict)
    realm_roles: list[str] = field(default_factory=list)
    client_roles: dict[str, list[str]] = field(default_factory=dict)
    group_ids: list[str] = field(default_factory=list)
    credentials: list[Credential] = field(default_factory=list)
    required_actions: list[str] = field(default_factory=list)
    service_account_client: str | None = None
    created_timestamp: int = 0

    @property
    def full_name(self) -> str:
        return " ".join(p for p in (self.first_name, self.last_name) if p)

    def check_password(self, password: str) -> bool:
        # Evaluate every credential so timing does not tell which one exists.
        ok = False
        for cred in self.credentials:
            ok |= cred.matches(password)
        return ok

    def representation(self, brief: bool = True) -> dict[str, Any]:
        rep: dict[str, Any] = {
            "id": self.id,
            "username": self.username,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "email": self.email,
            "emailVerified": self.email_verified,
            "createdTimestamp": self.created_timestamp,
            "enabled": self.enabled,
            "totp": False,
            "disableableCredentialTypes": [],
            "requiredActions": list(self.required_actions),
            "notBefore": 0,
        }
        rep = {k: v for k, v in rep.items() if v not in ("", None)}
        if self.service_account_client:
            rep["serviceAccountClientId"] = self.service_account_client
        if not brief:
            rep["attributes"] = {k: list(v) for k, v in self.attributes.items()}
        return rep


@dataclass
class Client:
    id: str
    client_id: str
    enabled: bool = True
    public: bool = False
    secret: str = ""
    bearer_only: bool = False
    standard_flow: bool = True
    direct_access_grants: bool = False
    service_accounts: bool = False
    redirect_uris: list[str] = field(default_factory=list)
    web_origins: list[str] = field(default_factory=list)
    post_logout_redirect_uris: list[str] = field(default_factory=list)
    pkce_method: str = ""
    #: Audiences added to access tokens by ``oidc-audience-mapper`` mappers.
    audiences: list[str] = field(default_factory=list)

    def check_secret(self, secret: str) -> bool:
        if self.public or not self.secret:
            return False
        return hmac.compare_digest(self.secret.encode(), secret.encode())

    def redirect_allowed(self, uri: str) -> bool:
        """Keycloak-style match: exact, or a pattern with a trailing ``*`` as prefix.

        A ``*`` in the port position (``http://127.0.0.1:*/*``) matches any port, which is what
        RFC 8252 asks for loopback redirects of native and browser apps on a dev box.
        """
        if not uri or len(uri) > 2000:
            return False
        for pattern in self.redirect_uris:
            if _uri_matches(pattern, uri):
                return True
        return False


def _uri_matches(pattern: str, uri: str) -> bool:
    if pattern == uri:
        return True
    if ":*" in pattern:
        head, _, tail = pattern.partition(":*")
        if not uri.startswith(head + ":"):
            return False
        rest = uri[len(head) + 1 :]
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits == 0 or digits > 5:
            return False
        return _uri_matches(tail, rest[digits:]) if tail else rest[digits:] == ""
    if pattern.endswith("*"):
        return uri.startswith(pattern[:-1])
    return False


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RealmError(f"{where}: expected a list of strings")
    return list(value)


def _attributes(value: Any, where: str) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RealmError(f"{where}: attributes must be an object")
    out: dict[str, list[str]] = {}
    for key, vals in value.items():
        if isinstance(vals, str):
            vals = [vals]
        out[str(key)] = _str_list(vals, f"{where}.{key}")
    return out


def _client_roles(value: Any, where: str) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RealmError(f"{where}: clientRoles must be an object")
    return {str(k): _str_list(v, f"{where}.{k}") for k, v in value.items()}


def _credential(raw: dict[str, Any]) -> Credential | None:
    if raw.get("type", "password") != "password":
        return None
    if isinstance(raw.get("value"), str):
        return Credential(value=raw["value"])
    try:
        secret = json.loads(raw.get("secretData") or "{}")
        data = json.loads(raw.get("credentialData") or "{}")
        return Credential(
            algorithm=str(data.get("algorithm", "")),
            iterations=int(data.get("hashIterations", 0)),
            salt=base64.b64decode(secret.get("salt", "")),
            hashed=base64.b64decode(secret.get("value", "")),
        )
    except (ValueError, TypeError):
        return None


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


@dataclass
class Realm:
    """The realm: lookups by id/name plus the few mutations the admin API offers."""

    name: str
    access_token_lifespan: int = 300
    sso_session_idle: int = 1800
    sso_session_max: int = 36000
    roles: set[str] = field(default_factory=set)
    groups: list[Group] = field(default_factory=list)  # top level, in file order
    users: dict[str, User] = field(default_factory=dict)  # by id
    clients: dict[str, Client] = field(default_factory=dict)  # by clientId

    # --- lookups --------------------------------------------------------------------------
    def all_groups(self) -> Iterator[Group]:
        stack = list(reversed(self.groups))
        while stack:
            group = stack.pop()
            yield group
            stack.extend(reversed(group.children))

    def group(self, group_id: str) -> Group | None:
        return next((g for g in self.all_groups() if g.id == group_id), None)

    def group_by_path(self, path: str) -> Group | None:
        path = path if path.startswith("/") else "/" + path
        return next((g for g in self.all_groups() if g.path == path), None)

    def user_by_name(self, username: str) -> User | None:
        wanted = username.lower()
        return next((u for u in self.users.values() if u.username == wanted), None)

    def user_by_login(self, login: str) -> User | None:
        """Username or e-mail, as Keycloak's login accepts both (loginWithEmailAllowed)."""
        user = self.user_by_name(login)
        if user is None and "@" in login:
            wanted = login.lower()
            user = next((u for u in self.users.values() if u.email and u.email.lower() == wanted), None)
        return user

    def service_account(self, client_id: str) -> User | None:
        return next((u for u in self.users.values() if u.service_account_client == client_id), None)

    def user_groups(self, user: User) -> list[Group]:
        return [g for g in (self.group(gid) for gid in user.group_ids) if g is not None]

    def effective_roles(self, user: User) -> tuple[list[str], dict[str, list[str]]]:
        """Realm roles and client roles of the user, including those inherited from groups
        (and from ancestors of those groups, as in Keycloak)."""
        realm_roles = list(user.realm_roles)
        client_roles = {k: list(v) for k, v in user.client_roles.items()}
        for group in self.user_groups(user):
            node: Group | None = group
            while node is not None:
                realm_roles += [r for r in node.realm_roles if r not in realm_roles]
                for cid, roles in node.client_roles.items():
                    have = client_roles.setdefault(cid, [])
                    have += [r for r in roles if r not in have]
                node = self.group(node.parent_id) if node.parent_id else None
        return realm_roles, client_roles

    # --- mutations (admin API) ------------------------------------------------------------
    def update_group(self, group: Group, rep: dict[str, Any]) -> None:
        """Apply a GroupRepresentation like Keycloak's ``PUT /groups/{id}`` (name, attributes)."""
        name = rep.get("name")
        if name is not None:
            if not isinstance(name, str) or not name.strip() or len(name) > 255:
                raise RealmError("name must be a non-empty string")
            siblings = (
                self.group(group.parent_id).children if group.parent_id else self.groups  # type: ignore[union-attr]
            )
            if any(s is not group and s.name == name for s in siblings):
                raise RealmError(f"Top level group named '{name}' already exists.")
        # As in Keycloak: "attributes": null (or absent) leaves them alone, {} clears them.
        raw_attributes = rep.get("attributes")
        attributes = _attributes(raw_attributes, "attributes") if raw_attributes is not None else None
        if attributes is not None:
            if len(attributes) > 100 or any(
                len(k) > 255 or len(v) > 100 or any(len(x) > 2000 for x in v) for k, v in attributes.items()
            ):
                raise RealmError("attributes too large")
        if name is not None and name != group.name:
            group.name = name
            self._repath(group)
        if attributes is not None:
            group.attributes = attributes

    def _repath(self, group: Group) -> None:
        parent = self.group(group.parent_id) if group.parent_id else None
        group.path = f"{parent.path}/{group.name}" if parent else f"/{group.name}"
        for child in group.children:
            self._repath(child)


def load_realm(path: str | Path) -> Realm:
    """Read a realm export. Raises :class:`RealmError` with a readable reason."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RealmError(f"can not read realm file {path}: {exc}") from exc
    except ValueError as exc:
        raise RealmError(f"realm file {path} is not JSON: {exc}") from exc
    return parse_realm(raw)


def parse_realm(raw: Any) -> Realm:
    if not isinstance(raw, dict) or not isinstance(raw.get("realm"), str):
        raise RealmError("a realm export is an object with a 'realm' name")
    name = raw["realm"]
    realm = Realm(
        name=name,
        access_token_lifespan=int(raw.get("accessTokenLifespan") or 300),
        sso_session_idle=int(raw.get("ssoSessionIdleTimeout") or 1800),
        sso_session_max=int(raw.get("ssoSessionMaxLifespan") or 36000),
    )
    roles = raw.get("roles") or {}
    for role in roles.get("realm") or []:
        if isinstance(role, dict) and isinstance(role.get("name"), str):
            realm.roles.add(role["name"])

    def add_group(rep: Any, parent: Group | None, where: str) -> Group:
        if not isinstance(rep, dict) or not isinstance(rep.get("name"), str):
            raise RealmError(f"{where}: a group needs a name")
        path = f"{parent.path if parent else ''}/{rep['name']}"
        group = Group(
            id=str(rep.get("id") or uuid.uuid5(_ID_NAMESPACE, f"{name}/group{path}")),
            name=rep["name"],
            path=path,
            attributes=_attributes(rep.get("attributes"), f"{where}.attributes"),
            realm_roles=_str_list(rep.get("realmRoles"), f"{where}.realmRoles"),
            client_roles=_client_roles(rep.get("clientRoles"), f"{where}.clientRoles"),
            parent_id=parent.id if parent else None,
        )
        for i, child in enumerate(rep.get("subGroups") or []):
            group.children.append(add_group(child, group, f"{where}.subGroups[{i}]"))
        return group

    for i, rep in enumerate(raw.get("groups") or []):
        realm.groups.append(add_group(rep, None, f"groups[{i}]"))

    for i, rep in enumerate(raw.get("clients") or []):
        if not isinstance(rep, dict) or not isinstance(rep.get("clientId"), str):
            raise RealmError(f"clients[{i}]: a client needs a clientId")
        if rep.get("protocol", "openid-connect") != "openid-connect":
            continue
        attrs = rep.get("attributes") or {}
        audiences = []
        for mapper in rep.get("protocolMappers") or []:
            if not isinstance(mapper, dict) or mapper.get("protocolMapper") != "oidc-audience-mapper":
                continue
            cfg = mapper.get("config") or {}
            if not _truthy(cfg.get("access.token.claim", "true")):
                continue
            for key in ("included.custom.audience", "included.client.audience"):
                if isinstance(cfg.get(key), str) and cfg[key]:
                    audiences.append(cfg[key])
        post_logout = attrs.get("post.logout.redirect.uris")
        client = Client(
            id=str(rep.get("id") or uuid.uuid5(_ID_NAMESPACE, f"{name}/client/{rep['clientId']}")),
            client_id=rep["clientId"],
            enabled=rep.get("enabled", True) is not False,
            public=bool(rep.get("publicClient", False)),
            secret=str(rep["secret"]) if isinstance(rep.get("secret"), str) else "",
            bearer_only=bool(rep.get("bearerOnly", False)),
            standard_flow=rep.get("standardFlowEnabled", True) is not False,
            direct_access_grants=bool(rep.get("directAccessGrantsEnabled", False)),
            service_accounts=bool(rep.get("serviceAccountsEnabled", False)),
            redirect_uris=_str_list(rep.get("redirectUris"), f"clients[{i}].redirectUris"),
            web_origins=_str_list(rep.get("webOrigins"), f"clients[{i}].webOrigins"),
            post_logout_redirect_uris=(
                [p for p in post_logout.split("##") if p] if isinstance(post_logout, str) else []
            ),
            pkce_method=str(attrs.get("pkce.code.challenge.method") or ""),
            audiences=audiences,
        )
        realm.clients[client.client_id] = client

    now_ms = int(time.time() * 1000)
    for i, rep in enumerate(raw.get("users") or []):
        where = f"users[{i}]"
        if not isinstance(rep, dict) or not isinstance(rep.get("username"), str):
            raise RealmError(f"{where}: a user needs a username")
        username = rep["username"].lower()
        group_ids = []
        for gpath in _str_list(rep.get("groups"), f"{where}.groups"):
            group = realm.group_by_path(gpath)
            if group is None:
                raise RealmError(f"{where}: unknown group {gpath!r}")
            group_ids.append(group.id)
        creds = [
            c for c in (_credential(c) for c in rep.get("credentials") or [] if isinstance(c, dict)) if c is not None
        ]
        user = User(
            id=str(rep.get("id") or uuid.uuid5(_ID_NAMESPACE, f"{name}/user/{username}")),
            username=username,
            enabled=rep.get("enabled", True) is not False,
            email=str(rep.get("email") or ""),
            email_verified=bool(rep.get("emailVerified", False)),
            first_name=str(rep.get("firstName") or ""),
            last_name=str(rep.get("lastName") or ""),
            attributes=_attributes(rep.get("attributes"), f"{where}.attributes"),
            realm_roles=_str_list(rep.get("realmRoles"), f"{where}.realmRoles"),
            client_roles=_client_roles(rep.get("clientRoles"), f"{where}.clientRoles"),
            group_ids=group_ids,
            credentials=creds,
            required_actions=_str_list(rep.get("requiredActions"), f"{where}.requiredActions"),
            service_account_client=rep.get("serviceAccountClientId") or None,
            created_timestamp=int(rep.get("createdTimestamp") or now_ms),
        )
        if user.id in realm.users or realm.user_by_name(username):
            raise RealmError(f"{where}: duplicate user {username!r}")
        realm.users[user.id] = user
    return realm
