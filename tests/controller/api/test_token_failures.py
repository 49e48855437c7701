"""The management API's limit on wrong tokens (bastion.api.deps.TokenFailures, token_refusal):
past TOKEN_FAILURES_LIMIT wrong tokens within the window an address gets 429 with Retry-After
for the rest of it, the right token too, on every path that checks a token (the handlers'
dependency, the body limits' early refusal of writes, the console's WebSocket); other
addresses, missing tokens and right tokens are not counted; the table is bounded."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from bastion.api.deps import TOKEN_FAILURE_WINDOW_S, TOKEN_FAILURES_LIMIT, TokenFailures
from bastion_testkit import TOKEN, auth
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

GUESSER = ("10.77.0.66", 40000)
OPERATOR = ("10.77.0.10", 40000)
STREAM = "/api/v1/machines/node1/console/stream"


class Clock:
    """A monotonic clock the test moves: the window's end without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def guesser(client_for, site_dir):
    client = client_for(site_dir, client=GUESSER)
    client.clock = Clock()
    client.app.state.runtime.token_failures = TokenFailures(clock=client.clock)
    return client


def console_close(client: TestClient, token: str) -> tuple[int, str]:
    with client.websocket_connect(STREAM) as ws:
        ws.send_text(json.dumps({"token": token}))
        with pytest.raises(WebSocketDisconnect) as e:
            while True:
                ws.receive_bytes()
    return e.value.code, e.value.reason


def test_past_the_limit_an_address_gets_429_even_with_the_right_token(guesser, caplog):
    with caplog.at_level(logging.WARNING, logger="bastion"):
        for _ in range(TOKEN_FAILURES_LIMIT):
            assert guesser.get("/api/v1/auth", headers=auth("guess")).status_code == 401
        r = guesser.get("/api/v1/auth", headers=auth())
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == str(int(TOKEN_FAILURE_WINDOW_S))
        assert r.json()["detail"] == "too many wrong tokens from 10.77.0.66: try again in 60 s"
        # a write is refused before its body (bastion.api.limits), the console's socket too
        r = guesser.post("/api/v1/reload", headers=auth())
        assert r.status_code == 429 and r.headers["Retry-After"] == "60", r.text
        closed = console_close(guesser, TOKEN)
        assert closed == (1013, "too many wrong tokens from 10.77.0.66: try again in 60 s")
        guesser.clock.now += 45
        assert guesser.get("/api/v1/auth", headers=auth("guess")).headers["Retry-After"] == "15"
    said = [r.getMessage() for r in caplog.records if "wrong API tokens" in r.getMessage()]
    assert said == [("10.77.0.66 sent 10 wrong API tokens within 60 s: its token checks are "
                     "refused (429) for 60 s")]  # fmt: skip
    # another host is not held back by it
    operator = TestClient(guesser.app, client=OPERATOR)
    assert operator.get("/api/v1/auth", headers=auth()).status_code == 200
    # the window ends: the address is answered again, and starts a new count
    guesser.clock.now += 15
    assert guesser.get("/api/v1/auth", headers=auth()).status_code == 200
    assert guesser.get("/api/v1/auth", headers=auth("guess")).status_code == 401


def test_every_path_that_checks_a_token_counts_a_wrong_one(guesser):
    metadata = "/api/v1/groups/machine:node1/metadata"
    assert guesser.get(metadata, headers=auth()).status_code == 200
    # writes (refused by the body limits), reads behind the token and the console's socket alike
    for i in range(TOKEN_FAILURES_LIMIT):
        if i % 3 == 0:
            r = guesser.post("/api/v1/reload", headers=auth("guess"), content=b"{}")
            assert r.status_code == 401
        elif i % 3 == 1:
            assert guesser.get(metadata, headers=auth("guess")).status_code == 401
        else:
            assert console_close(guesser, "guess") == (1008, "wrong token")
    assert guesser.get(metadata, headers=auth()).status_code == 429


def test_missing_and_right_tokens_are_not_counted(guesser):
    for _ in range(3 * TOKEN_FAILURES_LIMIT):
        assert guesser.get("/api/v1/auth").status_code == 401  # no token: nothing guessed
        assert guesser.get("/api/v1/auth", headers=auth()).status_code == 200
    for _ in range(TOKEN_FAILURES_LIMIT - 1):
        assert guesser.get("/api/v1/auth", headers=auth("guess")).status_code == 401
    assert guesser.get("/api/v1/auth", headers=auth()).status_code == 200
    assert guesser.get("/api/v1/auth", headers=auth("guess")).status_code == 401  # the limit's own
    assert guesser.get("/api/v1/auth", headers=auth()).status_code == 429


def test_the_table_forgets_ended_windows_and_keeps_to_its_bound():
    clock = Clock()
    failures = TokenFailures(limit=2, window=60, capacity=3, clock=clock)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        failures.failed(address)
        failures.failed(address)
    assert len(failures) == 3 and failures.retry_after("10.0.0.1") == 60
    clock.now += 1
    failures.failed("10.0.0.4")  # full: the oldest window goes
    assert len(failures) == 3 and failures.retry_after("10.0.0.1") is None
    assert failures.retry_after("10.0.0.2") == 59
    clock.now += 60  # every window has ended: the next address finds them gone
    failures.failed("10.0.0.5")
    assert len(failures) == 1 and failures.retry_after("10.0.0.5") is None


def test_a_real_server_answers_429_and_says_so_once_in_its_log(serve, site_dir):
    server = serve(site_dir)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(TOKEN_FAILURES_LIMIT + 3):
            c.get("/api/v1/auth", headers=auth("guess"))
        r = c.get("/api/v1/auth", headers=auth())
        assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 60, r.text
    log = server.log.read_text()
    assert log.count("127.0.0.1 sent 10 wrong API tokens within 60 s") == 1, log[-2000:]
