"""Who may call the HTTP API: the bind-address policy and the bearer-token check (stdlib only, so the
configuration can apply the policy without importing the web stack).

Policy: bound to a loopback address, the API is open to local processes unless a token is set;
bound to any other address, a token is required (the agent refuses to start without one).
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Optional

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names for them; False for anything else
    (0.0.0.0 and :: listen on every interface, so they are not loopback)."""
    h = (host or "").strip().lower().strip("[]")
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def token_required(host: str, token: Optional[str]) -> bool:
    """Whether requests must carry the token: always once one is set, and a non-loopback bind needs one."""
    return bool(token) or not is_loopback(host)


def check_exposure(host: str, token: Optional[str]) -> None:
    """Raise ValueError when the API would listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"api.token is required when api.host is not a loopback address (host {host!r})")


def token_matches(presented: Optional[str], expected: Optional[str]) -> bool:
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def bearer(authorization: Optional[str]) -> Optional[str]:
    """The token from an 'Authorization: Bearer <token>' header value."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
