"""PUT /api/v1/machines/{name} judges values as PATCH and the site loader do: what it writes is
what the client sent, so a strict field of machines.yaml (relay) refuses a boolean, a string or
a float there too, with the loader's words, instead of converting it into a relay channel."""

from __future__ import annotations

import pytest
import yaml
from bastion_testkit import auth

NEW = {"mac": "52:54:00:12:34:09", "role": "worker"}  # node9: not in examples/site


def site_files(site):
    return {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def problems(r) -> list[str]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]["problems"]


def field_problem(r, field: str) -> str:
    """The loader's words about `field` (its file, line and entry index differ by route)."""
    [problem] = problems(r)
    return problem.split(f".{field}: ", 1)[1]


@pytest.mark.parametrize("value, words", [
    (True, "must be an integer, not True"),
    ("5", "must be an integer, not '5'"),
    (7.0, "must be an integer, not 7.0"),
], ids=["true", "string", "float"])  # fmt: skip
def test_put_refuses_a_relay_patch_refuses_with_the_same_words(value, words, site_dir, client_for):
    c = client_for(site_dir)
    before = site_files(site_dir)
    put = c.put("/api/v1/machines/node9", json={**NEW, "relay": value}, headers=auth())
    patch = c.patch("/api/v1/machines/node1", json={"relay": value}, headers=auth())
    assert field_problem(put, "relay") == field_problem(patch, "relay") == words
    assert site_files(site_dir) == before
    assert c.get("/api/v1/machines/node9").status_code == 404
    # a whole number is still a channel
    ok = c.put("/api/v1/machines/node9", json={**NEW, "relay": 5}, headers=auth())
    assert ok.status_code == 200 and ok.json()["relay"] == 5, ok.text


def test_put_writes_a_maintenance_word_as_patch_does(site_dir, client_for):
    """The schema's `maintenance` is lax (true/false, or a word the loader reads as one): PUT
    takes what PATCH takes, writes it as sent, and both read back the same."""
    c = client_for(site_dir)
    put = c.put("/api/v1/machines/node9", json={**NEW, "maintenance": "off"}, headers=auth())
    patch = c.patch("/api/v1/machines/node1", json={"maintenance": "off"}, headers=auth())
    assert (put.status_code, patch.status_code) == (200, 200), (put.text, patch.text)
    assert put.json()["maintenance"] is patch.json()["maintenance"] is False
    written = {m["name"]: m for m in yaml.safe_load((site_dir / "machines.yaml").read_text())["machines"]}
    assert written["node9"]["maintenance"] == written["node1"]["maintenance"] == "off"

    # a value that is no boolean in any reading is refused by both, and nothing is written
    # (PUT's shape check names it as body.maintenance before the loader sees it)
    before = site_files(site_dir)
    put = c.put("/api/v1/machines/node8", json={"mac": "52:54:00:12:34:08", "maintenance": 2}, headers=auth())
    patch = c.patch("/api/v1/machines/node1", json={"maintenance": 2}, headers=auth())
    assert [e["loc"] for e in put.json()["detail"]] == [["body", "maintenance"]]
    assert field_problem(patch, "maintenance") == "must be true or false, not 2"
    assert site_files(site_dir) == before
