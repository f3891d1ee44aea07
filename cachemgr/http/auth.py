"""API keys and per-tenant cache namespaces.

A shared prefix cache leaks through timing: a request that hits someone else's cached prefix comes back
faster, which tells the sender that prefix was recently seen. Tenants are isolated by putting each in its
own cache namespace (the salt). With `salt_from_api_key`, the salt is derived from the caller's API key
with an HMAC, so one tenant cannot name another tenant's namespace; a client-sent `cache_salt` only
subdivides the caller's own namespace further.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cachemgr.http.errors import unauthorized

# Domain separation: the derived salt is useless as anything but a salt, and reveals nothing of the key.
_SALT_DOMAIN = b"radixkv/cache-salt/v1"
_KEY_SALT_PREFIX = "key:"


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which API keys are accepted and how a request's cache salt is formed. Immutable."""

    api_keys: frozenset[str] = frozenset()
    salt_from_api_key: bool = False

    def __post_init__(self) -> None:
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings")
        if self.salt_from_api_key and not self.api_keys:
            raise ValueError("salt_from_api_key needs at least one API key")

    @property
    def requires_key(self) -> bool:
        return bool(self.api_keys)

    def authenticate(self, authorization: str | None) -> str | None:
        """Return the caller's key (None when no keys are configured). Raises APIError 401 for a
        missing or wrong key. Every configured key is compared in constant time, so the response time
        does not tell which key (or how much of one) matched."""
        if not self.api_keys:
            return None
        if not authorization:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, candidate = authorization.strip().partition(" ")
        candidate = candidate.strip()
        if scheme.lower() != "bearer" or not candidate:
            raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        # Header bytes that are not UTF-8 arrive as lone surrogates (surrogateescape): compare the raw
        # bytes, which match no key, rather than fail to encode them (that was a 500).
        given = candidate.encode("utf-8", "surrogateescape")
        matched: str | None = None
        for key in sorted(self.api_keys):
            if hmac.compare_digest(given, key.encode()):
                matched = key
        if matched is None:
            raise unauthorized()
        return matched

    def cache_salt(self, api_key: str | None, client_salt: str) -> str:
        """The namespace salt for a request: the client's cache_salt as is, or, with
        salt_from_api_key, a per-key salt combined with it (so distinct keys never share a namespace,
        whatever cache_salt they send)."""
        if not self.salt_from_api_key:
            return client_salt
        if api_key is None:
            raise ValueError("salt_from_api_key needs the authenticated key")
        return f"{_KEY_SALT_PREFIX}{derive_key_salt(api_key)}:{client_salt}"


def derive_key_salt(api_key: str) -> str:
    """A stable 128-bit hex salt for an API key (the same key gives the same salt across restarts)."""
    return hmac.new(api_key.encode(), _SALT_DOMAIN, hashlib.sha256).hexdigest()[:32]
