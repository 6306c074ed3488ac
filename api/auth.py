"""Who is calling and what may they see: bearer tokens -> principals, and each request's access view.

``Authorization: Bearer cdm_...`` names a token; its principal's grants (registry/acl.py) decide which sources
of the served composition the request may use. Without the header the request is anonymous: refused with 401
unless ``[serve] anonymous_principal`` names a principal, whose grants then apply (off by default). A header that
is present but wrong is always 401, anonymous or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from api.errors import unauthorized
from registry.acl import AccessRegistry, AccessView


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    name: str
    token_id: str = ""  # "" for the anonymous principal

    @property
    def anonymous(self) -> bool:
        return not self.token_id


class Authenticator:
    """Resolves bearer tokens and reads access views.

    Args:
        access: tokens, grants and tags in the registry.
        anonymous_principal: the principal of requests without a token; "" refuses them (401).
    """

    def __init__(self, access: AccessRegistry, *, anonymous_principal: str = "") -> None:
        self.access = access
        self.anonymous_principal = anonymous_principal

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value (None when absent); ApiError 401 otherwise."""
        if authorization is None or not authorization.strip():
            if self.anonymous_principal:
                return Principal(self.anonymous_principal)
            raise unauthorized("this API needs a token: send 'Authorization: Bearer <token>' (cdm token create)")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise unauthorized("the Authorization header must be 'Bearer <token>'")
        record = self.access.resolve_token(credentials.strip())
        if record is None:
            raise unauthorized("the bearer token is not valid (unknown, revoked or malformed); ask for a new one")
        return Principal(record.principal, record.token_id)

    def view(self, principal: Principal, sources: Sequence[str]) -> AccessView:
        """What ``principal`` may use among ``sources`` (the served composition's), read now."""
        return self.access.view(principal.name, sources)
