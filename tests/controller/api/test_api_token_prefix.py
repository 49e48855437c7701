"""The limit on wrong tokens (bastion.api.deps.TokenFailures) counts an IPv6 client by its /64:
a host given a /64 takes a new address at will, and counted per address it had a fresh window
for each. An IPv4-mapped address is its IPv4 address; IPv4 addresses stay their own."""

from __future__ import annotations

import pytest
from bastion.api.deps import TOKEN_FAILURES_LIMIT, TokenFailures
from bastion_testkit import auth
from fastapi.testclient import TestClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def app(client_for, site_dir):
    client = client_for(site_dir)
    client.app.state.runtime.token_failures = TokenFailures(clock=Clock())
    return client.app


def test_an_ipv6_host_that_changes_address_in_its_64_gets_no_fresh_window(app):
    # each guess from another address of 2001:db8:0:7::/64, as a host with privacy addresses could
    for i in range(TOKEN_FAILURES_LIMIT):
        guesser = TestClient(app, client=(f"2001:db8:0:7:{i:x}::{i + 1:x}", 40000))
        assert guesser.get("/api/v1/auth", headers=auth("guess")).status_code == 401
    fresh = TestClient(app, client=("2001:db8:0:7:ffff:ffff:ffff:fffe", 40000))
    r = fresh.get("/api/v1/auth", headers=auth())
    assert r.status_code == 429, r.text
    assert r.json()["detail"] == "too many wrong tokens from 2001:db8:0:7::/64: try again in 60 s"
    # the next /64, and IPv4 hosts, are not held back by it
    for client in (("2001:db8:0:8::1", 40000), ("10.77.0.10", 40000)):
        assert TestClient(app, client=client).get("/api/v1/auth", headers=auth()).status_code == 200


def test_an_ipv4_mapped_address_counts_with_its_ipv4_address(app):
    for i in range(TOKEN_FAILURES_LIMIT):
        client = ("::ffff:10.77.0.66", 40000) if i % 2 else ("10.77.0.66", 40000)
        assert (
            TestClient(app, client=client).get("/api/v1/auth", headers=auth("guess")).status_code
            == 401
        )
    r = TestClient(app, client=("10.77.0.66", 40000)).get("/api/v1/auth", headers=auth())
    assert r.status_code == 429 and "from 10.77.0.66:" in r.json()["detail"], r.text
    # IPv4 neighbours stay apart: an IPv4 address is its own key
    assert (
        TestClient(app, client=("10.77.0.67", 40000))
        .get("/api/v1/auth", headers=auth())
        .status_code
        == 200
    )


def test_token_failure_key():
    from bastion.api.deps import token_failure_key

    assert token_failure_key("10.77.0.66") == "10.77.0.66"
    assert token_failure_key("::ffff:10.77.0.66") == "10.77.0.66"
    assert token_failure_key("2001:DB8::1:2:3:4") == "2001:db8::/64"
    assert token_failure_key("fe80::1%eth0") == "fe80::/64"
    assert token_failure_key("testclient") == "testclient"
    assert token_failure_key(None) is None
