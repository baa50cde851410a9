"""Who may see and do what: roles from sign-in claims, and when the app may serve at all.

Pure logic without Streamlit, so it is unit-tested on its own; ``ui.common`` is the glue that feeds
it ``st.user``, the secrets' ``[boneai]`` section and ``server.address``.

Two roles:

* ``reviewer``: review studies, save decisions, download reports, see their own reviews.
* ``admin``: also training jobs, registering models and choosing the default one, the whole review
  log and its export.

A signed-in user is an admin when the identity token carries the admin role in one of the role
claims (``roles`` or ``groups`` by default; a dotted path such as ``realm_access.roles`` reaches
Keycloak's nested claim), or when one of their identifiers (email, preferred_username, sub) is on
the admin list. Everyone else who signed in is a reviewer.

Example:
    >>> settings = settings_from({"admins": ["ana@example.org"]}, {})
    >>> resolve_role({"email": "ANA@example.org"}, settings)
    'admin'
    >>> resolve_role({"email": "bo@example.org", "groups": ["radiology"]}, settings)
    'reviewer'
    >>> serving_mode("0.0.0.0", sign_in_configured=False)
    'refuse'
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ADMIN",
    "REVIEWER",
    "ROLES",
    "LOCAL_USER",
    "AuthSettings",
    "settings_from",
    "resolve_role",
    "user_name",
    "allowed",
    "is_loopback",
    "serving_mode",
]

ADMIN = "admin"
REVIEWER = "reviewer"
#: Roles from least to most privileged.
ROLES = (REVIEWER, ADMIN)
#: The one user of the single-user mode (bound to loopback, no sign-in configured).
LOCAL_USER = "local"

#: Claims that name a user, in the order the app prefers for display and for the review log.
_NAME_CLAIMS = ("email", "preferred_username", "name", "sub")
#: Claims compared with the admin list: stable identifiers only, never the free-text display name.
_ID_CLAIMS = ("email", "preferred_username", "sub")
_SPLIT = re.compile(r"[\s,;]+")

ServingMode = Literal["local", "sign-in", "refuse"]


@dataclass(frozen=True)
class AuthSettings:
    """How roles are read: which claims hold roles, the admin role's value, and the admin list."""

    role_claims: tuple[str, ...] = ("roles", "groups")
    admin_role: str = "boneai-admin"
    admins: frozenset[str] = field(default_factory=frozenset)


def _words(value: Any) -> list[str]:
    """A claim or setting as a list of strings: a list as is, a string split on commas and spaces."""
    if value is None:
        return []
    if isinstance(value, str):
        return [w for w in _SPLIT.split(value) if w]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value)]


def settings_from(config: Mapping[str, Any] | None, env: Mapping[str, str] | None) -> AuthSettings:
    """Settings from the secrets' ``[boneai]`` section and the environment.

    ``[boneai]`` keys: ``admins`` (list or comma-separated string), ``role_claim`` (one claim or a
    list), ``admin_role``. Environment: ``BONEAI_ADMINS`` (comma-separated, added to the list),
    ``BONEAI_ROLE_CLAIM`` and ``BONEAI_ADMIN_ROLE`` (override the section).
    """
    config = config or {}
    env = env or {}
    defaults = AuthSettings()
    claims = _words(env.get("BONEAI_ROLE_CLAIM") or config.get("role_claim")) or list(defaults.role_claims)
    admin_role = (env.get("BONEAI_ADMIN_ROLE") or str(config.get("admin_role") or "")).strip() or defaults.admin_role
    admins = {a.lower() for a in _words(config.get("admins")) + _words(env.get("BONEAI_ADMINS"))}
    return AuthSettings(role_claims=tuple(claims), admin_role=admin_role, admins=frozenset(admins))


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested claims (``realm_access.roles``)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def resolve_role(claims: Mapping[str, Any], settings: AuthSettings) -> str:
    """``admin`` or ``reviewer`` for a signed-in user's identity-token claims.

    Role values are compared exactly (an IdP's group names are case-sensitive ids); identifiers on
    the admin list case-insensitively (email addresses are not).
    """
    for name in settings.role_claims:
        if settings.admin_role in _words(_claim(claims, name)):
            return ADMIN
    ids = {str(claims[c]).strip().lower() for c in _ID_CLAIMS if claims.get(c)}
    return ADMIN if ids & settings.admins else REVIEWER


def user_name(claims: Mapping[str, Any]) -> str:
    """The name the app shows and records for a signed-in user: email, else username, name or sub."""
    for c in _NAME_CLAIMS:
        value = claims.get(c)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "unknown"


def allowed(role: str, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed`` (an admin may do all a reviewer may)."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def is_loopback(address: str | None) -> bool:
    """Whether the server listens only on this machine.

    An unset or empty address means every interface (Streamlit's default), so it is not loopback;
    nor is a host name other than ``localhost``, since what it resolves to can change.
    """
    host = (address or "").strip().strip("[]")
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serving_mode(address: str | None, sign_in_configured: bool) -> ServingMode:
    """How the app serves: ``sign-in`` when configured, else ``local`` on loopback, else ``refuse``.

    Reachable from other machines without sign-in would hand everyone the admin's rights and the
    whole review log, so that case serves nothing.
    """
    if sign_in_configured:
        return "sign-in"
    return "local" if is_loopback(address) else "refuse"
