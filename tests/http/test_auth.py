from __future__ import annotations

import pytest

from cachemgr.http.auth import AccessPolicy, derive_key_salt
from cachemgr.http.errors import APIError


def _status(policy: AccessPolicy, header: str | None) -> int:
    with pytest.raises(APIError) as info:
        policy.authenticate(header)
    assert info.value.body()["error"]["type"] == "authentication_error"
    return info.value.status


def test_no_keys_configured_accepts_anything() -> None:
    policy = AccessPolicy()
    assert policy.authenticate(None) is None
    assert policy.authenticate("Bearer whatever") is None
    assert policy.cache_salt(None, "s") == "s"


def test_keys_checked() -> None:
    policy = AccessPolicy(api_keys=frozenset({"k1", "k2"}))
    assert policy.authenticate("Bearer k2") == "k2"
    assert policy.authenticate("bearer  k1 ") == "k1"
    assert [_status(policy, h) for h in (None, "", "Bearer", "Basic k1", "Bearer k3", "Bearer k1x")] == [
        401
    ] * 6


def test_salt_from_key_separates_tenants_whatever_salt_they_send() -> None:
    policy = AccessPolicy(api_keys=frozenset({"alice", "bob"}), salt_from_api_key=True)
    a = policy.cache_salt("alice", "")
    b = policy.cache_salt("bob", "")
    assert a == f"key:{derive_key_salt('alice')}:"
    assert len(derive_key_salt("alice")) == 32
    assert a != b
    # bob cannot reach alice's namespace by sending her derived salt as his cache_salt
    assert policy.cache_salt("bob", a) not in (a, policy.cache_salt("alice", a))
    assert policy.cache_salt("alice", "x") == a + "x"
    assert derive_key_salt("alice") == derive_key_salt("alice")


def test_bad_config_refused() -> None:
    with pytest.raises(ValueError):
        AccessPolicy(salt_from_api_key=True)
    with pytest.raises(ValueError):
        AccessPolicy(api_keys=frozenset({""}))
