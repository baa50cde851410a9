"""boneai.auth: roles from identity-token claims and the admin list, and the bind-address policy."""

from __future__ import annotations

import pytest

from boneai.auth import (
    ADMIN,
    REVIEWER,
    AuthSettings,
    allowed,
    is_loopback,
    resolve_role,
    serving_mode,
    settings_from,
    user_name,
)


def test_default_settings_read_roles_and_groups_for_boneai_admin() -> None:
    s = settings_from(None, None)
    assert s == AuthSettings(role_claims=("roles", "groups"), admin_role="boneai-admin", admins=frozenset())
    assert resolve_role({"sub": "1", "roles": ["boneai-admin"]}, s) == ADMIN
    assert resolve_role({"sub": "1", "groups": ["staff", "boneai-admin"]}, s) == ADMIN
    assert resolve_role({"sub": "1", "groups": "staff boneai-admin"}, s) == ADMIN  # space-separated string
    assert resolve_role({"sub": "1", "roles": ["boneai-reviewer"]}, s) == REVIEWER
    assert resolve_role({"sub": "1"}, s) == REVIEWER


def test_role_values_match_exactly_not_by_substring_or_case() -> None:
    s = settings_from(None, None)
    assert resolve_role({"roles": ["boneai-admins"]}, s) == REVIEWER
    assert resolve_role({"roles": ["BONEAI-ADMIN"]}, s) == REVIEWER
    assert resolve_role({"roles": "not-boneai-admin"}, s) == REVIEWER


def test_configured_claim_and_role_including_a_nested_keycloak_claim() -> None:
    s = settings_from({"role_claim": "realm_access.roles", "admin_role": "xray-admin"}, {})
    claims = {"sub": "k1", "realm_access": {"roles": ["offline_access", "xray-admin"]}}
    assert resolve_role(claims, s) == ADMIN
    # The default claims are no longer read once another claim is configured.
    assert resolve_role({"sub": "k2", "roles": ["boneai-admin"]}, s) == REVIEWER
    assert resolve_role({"sub": "k3", "realm_access": "xray-admin"}, s) == REVIEWER  # not a mapping: no crash


def test_environment_overrides_the_claim_and_adds_admins() -> None:
    s = settings_from({"admins": ["ana@example.org"], "role_claim": "roles"},
                      {"BONEAI_ADMINS": "bo@example.org, carl", "BONEAI_ROLE_CLAIM": "groups"})
    assert s.role_claims == ("groups",)
    assert s.admins == {"ana@example.org", "bo@example.org", "carl"}
    assert resolve_role({"groups": ["boneai-admin"]}, s) == ADMIN
    assert resolve_role({"roles": ["boneai-admin"]}, s) == REVIEWER


def test_admin_list_matches_stable_identifiers_case_insensitively_never_the_display_name() -> None:
    s = settings_from({"admins": "Ana@Example.org"}, {})
    assert resolve_role({"email": "ana@example.ORG"}, s) == ADMIN
    assert resolve_role({"preferred_username": "ana@example.org"}, s) == ADMIN
    assert resolve_role({"sub": "ana@example.org"}, s) == ADMIN
    # A display name is free text the user may be able to set: it never makes anyone an admin.
    assert resolve_role({"name": "ana@example.org", "email": "mallory@example.org"}, s) == REVIEWER


def test_user_name_prefers_email_then_username_then_name_then_sub() -> None:
    assert user_name({"sub": "s", "name": "N", "preferred_username": "u", "email": "e@x"}) == "e@x"
    assert user_name({"sub": "s", "name": "N", "preferred_username": "u"}) == "u"
    assert user_name({"sub": "s", "name": "N"}) == "N"
    assert user_name({"sub": "s", "email": "  "}) == "s"
    assert user_name({}) == "unknown"


def test_allowed_orders_roles_and_refuses_unknown_ones() -> None:
    assert allowed(ADMIN, ADMIN) and allowed(ADMIN, REVIEWER) and allowed(REVIEWER, REVIEWER)
    assert not allowed(REVIEWER, ADMIN)
    assert not allowed("superuser", REVIEWER) and not allowed(ADMIN, "superuser")


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), (None, False), ("", False), ("0.0.0.0", False), ("::", False),
    ("192.168.1.20", False), ("boneai.hospital.example", False), ("localhost.evil.example", False),
])
def test_is_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_serving_mode_refuses_a_reachable_address_without_sign_in() -> None:
    assert serving_mode("127.0.0.1", sign_in_configured=False) == "local"
    assert serving_mode(None, sign_in_configured=False) == "refuse"  # Streamlit's default: all interfaces
    assert serving_mode("0.0.0.0", sign_in_configured=False) == "refuse"
    assert serving_mode("0.0.0.0", sign_in_configured=True) == "sign-in"
    # Sign-in configured: everyone signs in, on loopback too (a reverse proxy usually sits in front).
    assert serving_mode("127.0.0.1", sign_in_configured=True) == "sign-in"
