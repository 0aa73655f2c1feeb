"""One exception type for every refusal, carrying a stable code and an HTTP status.

The domain, policy and planes raise :class:`GatewayError`; the API layer turns it into
``{"error": {"code": ..., "message": ...}}`` with ``status``. Codes are part of the contract
(API.md, DESIGN.md §2): never rename one.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """A refusal with a stable machine-readable ``code``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        #: Extra HTTP headers for the answer (e.g. ``Retry-After``).
        self.headers: dict[str, str] = {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.extra)
        return {"error": body}

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def not_found(what: str) -> GatewayError:
    return GatewayError(404, "not_found", f"{what} not found")


def invalid_token(reason: str) -> GatewayError:
    return GatewayError(401, "invalid_token", f"invalid token: {reason}")


def forbidden_role(role: str) -> GatewayError:
    return GatewayError(403, "forbidden", f"this call needs the {role!r} role")


def identity_unavailable(detail: str = "identity provider unreachable") -> GatewayError:
    return GatewayError(503, "identity_unavailable", detail)
