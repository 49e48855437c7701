"""What an undeclared machine's request tells its templates (render.config.jinja_variables):
`machine.hostname`, `machine.arch` and `machine.uuid` only when each is one as machines.yaml
would take it, else none, as if not sent. Through the real app, with the shipped worker.bu and
with a template that writes the values unquoted, as a site's own may. An invalid one is warned
about once a minute per client address and fact, not once per request."""

from __future__ import annotations

import base64
import logging
import urllib.parse
from pathlib import Path

import pytest
from bastion.model import BootRequest
from bastion.render import config
from bastion.render.config import LogThrottle, request_fact
from bastion_testkit import assert_valid_ignition
from fastapi.testclient import TestClient

UNDECLARED = "52:54:00:aa:bb:cc"
SHIPPED_FILES = ["/etc/hostname", "/etc/motd.d/bastion.conf", "/etc/bastion/node.env"]
INJECTED = "x\n    - path: /etc/evil\n      contents:\n        inline: pwned"


def with_default_profile(site_dir: Path, template: str) -> Path:
    site = site_dir / "site.yaml"
    site.write_text(site.read_text().replace("# default_profile: flatcar-worker", "default_profile: flatcar-worker"))
    if template == "unquoted":  # the example as it was: the value straight into YAML
        bu = site_dir / "ignition" / "worker.bu"
        text = bu.read_text()
        assert 'inline: {{ (machine.hostname or "") | tojson }}' in text
        bu.write_text(text.replace('inline: {{ (machine.hostname or "") | tojson }}', "inline: {{ machine.hostname }}"))
    return site_dir


def files(config: dict) -> dict[str, str]:
    out = {}
    for f in config["storage"]["files"]:
        source = f["contents"]["source"]
        head, _, data = source.partition(",")
        out[f["path"]] = (base64.b64decode(data).decode() if head.endswith(";base64")
                          else urllib.parse.unquote(data))  # fmt: skip
    return out


@pytest.mark.parametrize("template", ["shipped", "unquoted"])
@pytest.mark.parametrize("hostname", [INJECTED, "a: b", "-x", "x" * 64, "${x}"],
                         ids=["line-breaks", "colon", "leading-dash", "label-too-long", "dollar"])
def test_a_request_hostname_that_is_no_host_name_is_not_given(hostname, template, site_dir, client_for, tmp_path):
    c = client_for(with_default_profile(site_dir, template))
    r = c.get("/ignition", params={"mac": UNDECLARED, "hostname": hostname})
    assert r.status_code == 200, r.text
    got = files(r.json())
    assert list(got) == SHIPPED_FILES
    # not given: the shipped template writes an empty /etc/hostname, an unquoted one "None"
    assert got["/etc/hostname"] == {"shipped": "", "unquoted": "None"}[template]
    assert_valid_ignition(r.json(), tmp_path)
    # and no render error is recorded against the site's template
    assert all(not e["payload"].get("error") for e in c.get("/api/v1/events", params={"limit": 5}).json())


@pytest.mark.parametrize("template", ["shipped", "unquoted"])
def test_valid_request_facts_reach_the_template(template, site_dir, client_for):
    c = client_for(with_default_profile(site_dir, template))
    r = c.get("/ignition", params={"mac": UNDECLARED, "hostname": "edge-7.lan", "arch": "amd64"})
    assert r.status_code == 200, r.text
    got = files(r.json())
    assert got["/etc/hostname"] == "edge-7.lan"
    assert "NODE_ARCH=x86_64\n" in got["/etc/bastion/node.env"]  # an alias, read as machines.yaml does


def test_a_bad_arch_or_uuid_adds_no_line_to_the_node_env(site_dir, client_for):
    c = client_for(with_default_profile(site_dir, "shipped"))
    r = c.get("/ignition", params={"mac": UNDECLARED, "arch": "x86_64\nEVIL=1",
                                   "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427\nEnvironment=EVIL=1"})  # fmt: skip
    assert r.status_code == 200, r.text
    env = files(r.json())["/etc/bastion/node.env"]
    assert "EVIL" not in env and "NODE_ARCH=None\n" in env
    dropin = r.json()["systemd"]["units"][0]["dropins"][0]["contents"]
    assert "EVIL" not in dropin and "Environment=NODE_UUID=\n" in dropin


@pytest.mark.parametrize("key, value, expected", [
    ("hostname", "node-1.example.lan", "node-1.example.lan"),
    ("hostname", "node_1", None),
    ("hostname", "a" * 254, None),
    ("arch", "arm64", "arm64"),
    ("arch", "aarch64", "arm64"),
    ("arch", "sparc", None),
    ("uuid", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
    ("uuid", "{1b4e28ba-2fa1-11d2-883f-0016d3cca427}", None),
    ("uuid", "1b4e28ba2fa111d2883f0016d3cca427", None),
    ("uuid", "", None),
])  # fmt: skip
def test_request_fact(key, value, expected, caplog, monkeypatch):
    monkeypatch.setattr(config, "INVALID_FACT_WARNINGS", LogThrottle())  # nothing warned before
    req = BootRequest({key: value}, "", "http://10.77.0.1:8080", client="10.77.0.50")
    with caplog.at_level(logging.WARNING, logger="bastion.render"):
        assert request_fact(req, key) == expected
    warned = [r.getMessage() for r in caplog.records if r.name == "bastion.render"]
    if expected is None and value:
        assert warned == [f"boot request from 10.77.0.50: {key}={value[:80]!a} is not valid; rendered as if not given"]
    else:
        assert warned == []


def test_invalid_facts_are_warned_once_a_minute_per_client_and_fact(site_dir, client_for, caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(config, "INVALID_FACT_WARNINGS", LogThrottle(clock=lambda: now[0]))
    a = client_for(with_default_profile(site_dir, "shipped"), client=("10.77.0.60", 40000))
    b = TestClient(a.app, client=("10.77.0.61", 40000))

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "bastion.render"]

    with caplog.at_level(logging.WARNING, logger="bastion.render"):
        for _ in range(5):  # one host in a loop: one line
            assert a.get("/ignition", params={"mac": UNDECLARED, "hostname": "a: b"}).status_code == 200
        assert warned() == ["boot request from 10.77.0.60: hostname='a: b' is not valid; rendered as if not given"]
        # another address, and another fact from the first one, each have their own line
        assert b.get("/ignition", params={"mac": UNDECLARED, "hostname": "a: b"}).status_code == 200
        assert a.get("/ignition", params={"mac": UNDECLARED, "arch": "sparc"}).status_code == 200
        assert warned()[1:] == [
            "boot request from 10.77.0.61: hostname='a: b' is not valid; rendered as if not given",
            "boot request from 10.77.0.60: arch='sparc' is not valid; rendered as if not given",
        ]
        now[0] += 60  # a minute on: the next one is logged, and counts those held back
        assert a.get("/ignition", params={"mac": UNDECLARED, "hostname": "-x"}).status_code == 200
        assert warned()[3:] == [
            ("boot request from 10.77.0.60: hostname='-x' is not valid; rendered as if not given "
             "(4 more such hostname values from 10.77.0.60 since the last warning)"),
        ]


def test_the_throttle_forgets_its_oldest_key_past_its_capacity():
    now = [0.0]
    throttle = LogThrottle(window_s=60, capacity=2, clock=lambda: now[0])
    assert [throttle.admit(k) for k in ("a", "b", "a", "c")] == [0, 0, None, 0]
    # "a" was logged longest ago and went when "c" came: its next warning is a first one
    assert throttle.admit("a") == 0
    assert throttle.admit("c") is None
