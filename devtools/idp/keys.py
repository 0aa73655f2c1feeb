"""The embedded provider's RS256 signing key: generated once, persisted under ``data_dir``.

Persisting the key means a restart of the gateway keeps every token it issued valid, as a
Keycloak restart does (its keys live in its database).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from jwcrypto import jwk

KEY_FILE = "idp-signing-key.json"


def load_or_create_key(data_dir: str | Path) -> jwk.JWK:
    """Return the private RSA key from ``{data_dir}/idp-signing-key.json``, creating it if absent.

    The file is written atomically with mode 0600; ``kid`` is the RFC 7638 thumbprint.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / KEY_FILE
    if path.exists():
        try:
            key = jwk.JWK(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise RuntimeError(
                f"{path} is not a JWK private key ({exc}); remove it to make a new one "
                "(tokens signed with the old key then stop validating)"
            ) from exc
        if key.get("kty") != "RSA" or not key.has_private:
            raise RuntimeError(f"{path} does not hold a private RSA key")
        return key
    key = jwk.JWK.generate(kty="RSA", size=2048)
    data = json.loads(key.export_private())
    data.update(kid=key.thumbprint(), alg="RS256", use="sig")
    fd, tmp = tempfile.mkstemp(prefix=".idp-key-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.chmod(tmp, 0o600)
        try:
            # link() fails if another process created the key meanwhile: use theirs.
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return load_or_create_key(directory)


def public_jwks(key: jwk.JWK) -> dict[str, list[dict[str, str]]]:
    """The JWKS document (``/certs``) with the public half only."""
    public = json.loads(key.export_public())
    public.update(kid=key.get("kid") or key.thumbprint(), alg="RS256", use="sig")
    return {"keys": [public]}
