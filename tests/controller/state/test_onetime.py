"""One-time Ignition URLs (bastion.state.onetime): a profile whose Ignition reads `secrets` gets a
token in its boot script, good once, for the address that fetched the script, until it expires.

Every case goes through the app as a node would: the boot script first (/ipxe or /grub), the
Ignition URL taken from its kernel arguments, then /ignition. Time is a fake clock on the token
table, never a sleep. The secrets come from a SecretStore in tmp_path (the site's machines are
not k3s nodes, so bastion.state.secrets.machine_secrets would give them none).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from bastion.api.main import create_app
from bastion.state.onetime import IgnitionTokens, TokenRefused, digest
from bastion.state.secrets import SecretStore
from bastion.settings import Settings
from bastion.site.load import SiteError, load_site
from bastion_testkit import TOKEN, auth, write_assets
from fastapi.testclient import TestClient

NODE = ("10.77.0.21", 40000)  # the node's address, as iPXE and then Ignition use it
NODE3 = ("10.77.0.23", 40000)  # n3's own: no two machines share an address
OTHER = ("10.77.0.66", 40000)  # another host on the LAN
N1_MAC = "52:54:00:00:00:01"
N2_MAC = "52:54:00:00:00:02"
N3_MAC = "52:54:00:00:00:03"

SECRET_BU = """\
variant: flatcar
version: 1.0.0
storage:
  files:
    - path: /etc/token
      mode: 0600
      contents:
        inline: {{ secrets.token }}
"""
PLAIN_BU = """\
variant: flatcar
version: 1.0.0
storage:
  files:
    - path: /etc/hostname
      mode: 0644
      contents:
        inline: {{ machine.hostname }}
"""
GENERIC = "TOKEN={{ secrets.token }}\n"


def make_site(root: Path) -> Path:
    """n1 and n3 hold secrets (each at its own address, as the site loader requires), n2 not."""
    site = root / "site"
    for d in ("profiles", "ignition", "generic"):
        (site / d).mkdir(parents=True)
    (site / "site.yaml").write_text("site: s\nroles:\n  secret: secret\n  plain: plain\n")
    (site / "machines.yaml").write_text(
        "machines:\n"
        f"  - name: n1\n    mac: {N1_MAC}\n    role: secret\n    address: {NODE[0]}\n"
        f"  - name: n2\n    mac: {N2_MAC}\n    role: plain\n"
        f"  - name: n3\n    mac: {N3_MAC}\n    role: secret\n    address: {NODE3[0]}\n"
    )
    kernel = (
        "kernel: /assets/flatcar/amd64/flatcar_production_pxe.vmlinuz\n"
        "initrd:\n  - /assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz\n"
    )
    (site / "profiles" / "secret.yaml").write_text(kernel + "ignition: secret.bu\ngeneric: secret.env\n")
    (site / "profiles" / "plain.yaml").write_text(kernel + "ignition: plain.bu\n")
    (site / "ignition" / "secret.bu").write_text(SECRET_BU)
    (site / "ignition" / "plain.bu").write_text(PLAIN_BU)
    (site / "generic" / "secret.env").write_text(GENERIC)
    write_assets(site, ("flatcar/amd64",))
    return site


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Controller:
    """The app on a real SQLite file, a clock, and clients at two addresses."""

    def __init__(self, tmp_path: Path, db: Path | None = None, ttl: float = 900):
        self.site = make_site(tmp_path) if not (tmp_path / "site").exists() else tmp_path / "site"
        self.db = db or tmp_path / "events.db"
        self.store = SecretStore(tmp_path / "secrets")
        settings = Settings(site_dir=self.site, db_path=self.db, api_token=TOKEN, poll_seconds=0,
                            secrets_dir=tmp_path / "secrets", ignition_token_ttl=ttl)  # fmt: skip
        self.app = create_app(settings)
        self.runtime = self.app.state.runtime
        self.clock = Clock()
        self.runtime.provisioning.tokens.clock = self.clock
        self.runtime.provisioning = dataclasses.replace(
            self.runtime.provisioning,
            secrets_for=lambda site, m: {"token": self.store.get_or_create(f"test/{m.name}")},
        )
        self.node = TestClient(self.app, base_url="http://10.77.0.1:8080", client=NODE)
        self.node3 = TestClient(self.app, base_url="http://10.77.0.1:8080", client=NODE3)
        self.other = TestClient(self.app, base_url="http://10.77.0.1:8080", client=OTHER)

    def ignition_url(self, mac: str, loader: str = "ipxe", client: TestClient | None = None) -> str:
        """The boot script's ignition.config.url, path and query."""
        r = (client or self.node).get(f"/{loader}", params={"mac": mac, "arch": "x86_64"})
        assert r.status_code == 200, r.text
        m = re.search(r'ignition\.config\.url=(\S+?)"?(\s|$)', r.text)
        assert m, r.text
        url = urlsplit(m.group(1))
        assert url.netloc == "10.77.0.1:8080"
        return f"{url.path}?{url.query}"

    def events(self, kind: str) -> list[dict]:
        return [e.as_dict() for e in reversed(self.runtime.store.query(kind=kind))]


@pytest.fixture
def ctl(tmp_path: Path) -> Controller:
    return Controller(tmp_path)


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def test_the_boot_script_carries_a_token_only_for_secret_holding_profiles(ctl):
    url = ctl.ignition_url(N1_MAC)
    assert re.fullmatch(r"/ignition\?token=[0-9a-f]{64}&mac=52-54-00-00-00-01", url), url
    assert ctl.ignition_url(N2_MAC) == "/ignition?mac=52-54-00-00-00-02"  # plain: as before
    # GRUB too: the same token URL in both menu entries, quoted for GRUB
    r = ctl.node.get("/grub", params={"mac": N1_MAC})
    urls = re.findall(r'"ignition\.config\.url=([^"]+)"', r.text)
    assert len(urls) == 2 and urls[0] == urls[1] and "token=" in urls[0] and "mac=52-54-00-00-00-01" in urls[0]
    r = ctl.node.get("/grub", params={"mac": N2_MAC})
    assert "token=" not in r.text and "ignition?mac=52-54-00-00-00-02" in r.text
    # every script has its own token, and only its hash is stored
    t1, t2 = token_of(ctl.ignition_url(N1_MAC)), token_of(ctl.ignition_url(N1_MAC))
    assert t1 != t2
    raw = ctl.db.read_bytes() + (ctl.db.with_name(ctl.db.name + "-wal").read_bytes()
                                 if ctl.db.with_name(ctl.db.name + "-wal").exists() else b"")  # fmt: skip
    assert t1.encode() not in raw and t2.encode() not in raw and digest(t2).encode() in raw


def test_the_url_works_once_for_the_node_and_is_recorded(ctl):
    url = ctl.ignition_url(N1_MAC)
    r = ctl.node.get(url)
    assert r.status_code == 200, r.text
    config = r.json()
    secret = ctl.store.get("test/n1")
    assert config["storage"]["files"][0]["contents"]["source"] == f"data:,{secret}"
    again = ctl.node.get(url)
    assert again.status_code == 410 and "already used" in again.text and secret not in again.text
    events = ctl.events("ignition-token")
    assert [(e["payload"]["action"], e["payload"].get("reason"), e["status"]) for e in events] == [
        ("issued", None, 200), ("fetched", None, 200), ("refused", "reused", 410)
    ]  # fmt: skip
    assert {e["machine"] for e in events} == {"n1"} and {e["mac"] for e in events} == {N1_MAC}
    ref = events[0]["payload"]["token"]
    assert all(e["payload"]["token"] == ref for e in events) and ref == digest(token_of(url))[:12]
    # the history never holds a usable token (GET /api/v1/events is open)
    history = json.dumps(ctl.node.get("/api/v1/events", params={"limit": 1000}).json())
    assert token_of(url) not in history and "token=(redacted)" in history


def test_another_address_or_mac_is_refused_and_does_not_use_the_token(ctl):
    url = ctl.ignition_url(N1_MAC)
    r = ctl.other.get(url)
    assert r.status_code == 403
    assert "belongs to n1, whose boot script went to 10.77.0.21; this request came from 10.77.0.66" in r.text
    edited = url.replace("mac=52-54-00-00-00-01", "mac=52-54-00-00-00-02")
    r = ctl.node.get(edited)
    assert r.status_code == 403 and "belongs to n1 (52:54:00:00:00:01), not 52:54:00:00:00:02" in r.text
    assert ctl.node.get(url).status_code == 200  # the node's own fetch still works
    reasons = [(e["payload"]["action"], e["payload"].get("reason"), e["payload"].get("client"))
               for e in ctl.events("ignition-token")]  # fmt: skip
    assert reasons == [
        ("issued", None, NODE[0]),
        ("refused", "wrong-machine", OTHER[0]),
        ("refused", "wrong-machine", NODE[0]),
        ("fetched", None, NODE[0]),
    ]
    refused = ctl.events("ignition-token")[1]
    assert refused["payload"]["expected_client"] == NODE[0] and refused["machine"] == "n1"


def test_a_late_fetch_is_refused(tmp_path):
    ctl = Controller(tmp_path, ttl=600)
    url = ctl.ignition_url(N1_MAC)
    ctl.clock.t += 600
    r = ctl.node.get(url)
    assert r.status_code == 410 and "expired 0 s ago (it is good for 600 s)" in r.text
    url = ctl.ignition_url(N1_MAC)
    ctl.clock.t += 599
    assert ctl.node.get(url).status_code == 200
    assert [e["payload"].get("reason") for e in ctl.events("ignition-token")
            if e["payload"]["action"] == "refused"] == ["expired"]  # fmt: skip


def test_unknown_and_malformed_tokens_are_refused(ctl):
    for token in ("0" * 64, "not-a-token", ""):
        r = ctl.node.get("/ignition", params={"token": token, "mac": "52-54-00-00-00-01"})
        assert r.status_code == 403 and "unknown Ignition token" in r.text
    events = ctl.events("ignition-token")
    assert [e["payload"]["reason"] for e in events] == ["unknown"] * 3
    assert all(e["machine"] == "n1" for e in events)  # named from the URL's MAC


def test_a_newer_boot_script_supersedes_the_older_token(ctl):
    old = ctl.ignition_url(N1_MAC)
    new = ctl.ignition_url(N1_MAC)
    r = ctl.node.get(old)
    assert r.status_code == 410 and "replaced by a newer boot script" in r.text
    assert ctl.node.get(new).status_code == 200


def test_a_used_token_stays_used_after_a_restart(tmp_path):
    first = Controller(tmp_path)
    url = first.ignition_url(N1_MAC)
    unused = first.ignition_url(N3_MAC, client=first.node3)
    assert first.node.get(url).status_code == 200
    first.runtime.provisioning.tokens.close()
    second = Controller(tmp_path)  # a new process on the same database
    second.clock.t = first.clock.t
    r = second.node.get(url)
    assert r.status_code == 410 and "already used" in r.text
    assert second.node3.get(unused).status_code == 200  # an unused one survives the restart too


def test_another_host_cannot_obtain_a_nodes_secrets(ctl):
    """A host on the LAN that asks for the node's boot script, config or metadata with its MAC
    gets no token and no secret; the node then boots as if nothing happened."""
    secret = ctl.store.get_or_create("test/n1")
    for loader in ("ipxe", "grub"):
        r = ctl.other.get(f"/{loader}", params={"mac": N1_MAC, "arch": "x86_64"})
        assert r.status_code == 403 and "token=" not in r.text, r.text
    for path in ("/ignition", "/generic", "/metadata"):
        assert secret not in ctl.other.get(path, params={"mac": N1_MAC}).text
    r = ctl.node.get(ctl.ignition_url(N1_MAC))
    assert r.status_code == 200 and secret in r.text
    refused = [e for e in ctl.events("ignition-token") if e["payload"]["action"] == "refused"]
    assert [(e["payload"]["client"], e["payload"]["expected_client"]) for e in refused] == [
        (OTHER[0], NODE[0]), (OTHER[0], NODE[0])
    ]  # fmt: skip


def test_a_secret_holding_machine_without_an_address_does_not_load(tmp_path, client_for):
    site = make_site(tmp_path)
    machines = (site / "machines.yaml").read_text()
    (site / "machines.yaml").write_text(machines.replace(f"    address: {NODE[0]}\n", "", 1))
    with pytest.raises(SiteError) as e:
        load_site(site)
    assert e.value.problems == [
        "machines.yaml:2: machines[0].address: is required: n1 boots profile 'secret', whose "
        "Ignition (ignition/secret.bu) reads secrets, sent on a one-time URL in its boot script; "
        "without an address, any host on the LAN that asks for the script first gets them. Set "
        "address: to the fixed IP its DHCP reservation gives it; only that address then gets "
        "the script"
    ]
    # nor through the API: an edit that would add one is refused, and nothing is written
    (site / "machines.yaml").write_text(machines)
    c = client_for(site)
    entry = {"mac": "52:54:00:00:00:04", "role": "secret"}
    r = c.put("/api/v1/machines/n4", json=entry, headers=auth())
    assert r.status_code == 422 and "machines[3].address: is required: n4" in r.text, r.text
    assert (site / "machines.yaml").read_text() == machines


def test_a_custom_profile_whose_ignition_reads_secrets_does_not_load(tmp_path):
    # The one-time URL is the ignition.config.url the controller writes into an os: flatcar
    # profile's arguments; an os: custom profile's are used as written, so its config could
    # never be served (its own /ignition?mac= URL answers 403), which the check now says.
    site = make_site(tmp_path)
    for name in ("secret", "plain"):
        profile = site / "profiles" / f"{name}.yaml"
        own_url = "args:\n  - ignition.config.url=http://10.77.0.1:8080/ignition?mac=${mac:hexhyp}\n"
        profile.write_text("os: custom\n" + profile.read_text() + own_url)
    with pytest.raises(SiteError) as e:
        load_site(site)
    assert e.value.problems == [(
        "profiles/secret.yaml: os: is custom, but its Ignition (ignition/secret.bu) reads "
        "secrets, which a node gets only on the one-time URL the controller writes into an "
        "os: flatcar profile's kernel arguments (ignition.config.url); a custom profile's "
        "arguments are used as written, and its /ignition?mac= URL is refused (403). Use os: "
        "flatcar, or keep secrets out of the template"
    )]  # fmt: skip


def test_a_declared_address_gets_the_script_only_there(ctl):
    r = ctl.other.get("/ipxe", params={"mac": N3_MAC})
    assert r.status_code == 403 and "served only to its address 10.77.0.23" in r.text
    assert "token=" not in r.text
    url = ctl.ignition_url(N3_MAC, client=ctl.node3)  # from its address
    assert ctl.node3.get(url).status_code == 200
    first = ctl.events("ignition-token")[0]
    assert first["payload"]["reason"] == "wrong-machine" and first["endpoint"] == "/ipxe"


def test_public_endpoints_never_show_secrets(ctl):
    secret = ctl.store.get_or_create("test/n1")
    r = ctl.node.get("/ignition", params={"mac": N1_MAC})
    assert r.status_code == 403 and "one-time URL" in r.text
    r = ctl.node.get("/generic", params={"mac": N1_MAC})
    assert r.status_code == 403 and "one-time URL" in r.text
    r = ctl.node.get("/metadata", params={"mac": N1_MAC})
    assert r.status_code == 200 and "SECRET" not in r.text
    # the management API's reads, with the token too, and the machine's Ignition behind it
    for path in ("/api/v1/machines", "/api/v1/machines/n1", "/api/v1/profiles", "/api/v1/profiles/secret",
                 "/api/v1/groups", "/api/v1/groups/machine:n1/metadata", "/api/v1/site"):  # fmt: skip
        r = ctl.node.get(path, headers=auth())
        assert r.status_code == 200, (path, r.text)
        assert secret not in r.text and '"secrets"' not in r.text, path
    r = ctl.node.get("/api/v1/machines/n1/ignition", headers=auth())
    assert r.status_code == 403 and "one-time URL" in r.text and secret not in r.text
    # and the token URL of another machine's script does not open this one
    assert secret not in ctl.node.get(ctl.ignition_url(N2_MAC)).text


def test_a_config_that_cannot_be_rendered_leaves_the_token_good(ctl):
    prov = ctl.runtime.provisioning
    ctl.runtime.provisioning = dataclasses.replace(prov, secrets_for=lambda site, m: {})
    url = ctl.ignition_url(N1_MAC)
    r = ctl.node.get(url)
    assert r.status_code == 500 and "secret.bu" in r.text
    ctl.runtime.provisioning = prov
    assert ctl.node.get(url).status_code == 200


@pytest.mark.parametrize("secret", ["x\n- hunter2-key-line", "-----BEGIN KEY-----\nhunter2KEYDATA\n  bad: [x"])
def test_a_secret_that_breaks_the_config_is_never_quoted(ctl, secret):
    # unquoted in the template (inline: {{ secrets.token }}), a value of several lines breaks
    # the YAML, whose error quoted the line it failed at: a line of the secret, kept in the
    # history (and its answer) for anyone who reads it
    prov = ctl.runtime.provisioning
    ctl.runtime.provisioning = dataclasses.replace(prov, secrets_for=lambda site, m: {"token": secret})
    r = ctl.node.get(ctl.ignition_url(N1_MAC))
    assert r.status_code == 500
    assert "ignition/secret.bu: the machine's secrets break the config" in r.text, r.text
    said = [r.text] + [json.dumps(e) for e in ctl.events("boot")]
    assert not [t for t in said if "hunter2" in t or "bad: [" in t], said


def test_a_render_error_that_quotes_no_secret_is_said_as_it_is(ctl):
    prov = ctl.runtime.provisioning
    ctl.runtime.provisioning = dataclasses.replace(prov, secrets_for=lambda site, m: {"token": "a: b"})
    r = ctl.node.get(ctl.ignition_url(N1_MAC))
    assert r.status_code == 500 and "ignition/secret.bu:8: mapping values are not allowed" in r.text


def test_the_controller_asks_bastion_secrets_for_the_machines_secrets(tmp_path, monkeypatch):
    """The wiring in create_app: machine_secrets(the runtime's SecretStore, site, machine)."""
    import bastion.api.main

    seen = []

    def fake(store, site, machine):
        seen.append((store.root, machine.name))
        return {"token": "from-machine-secrets"}

    monkeypatch.setattr(bastion.api.main, "machine_secrets", fake)
    site = make_site(tmp_path)
    app = create_app(Settings(site_dir=site, db_path=tmp_path / "e.db", secrets_dir=tmp_path / "sec"))
    client = TestClient(app, client=NODE)
    r = client.get("/ipxe", params={"mac": N1_MAC})
    url = re.search(r"ignition\.config\.url=\S+?(/ignition\S+)", r.text).group(1)
    config = client.get(url).json()
    assert config["storage"]["files"][0]["contents"]["source"] == "data:,from-machine-secrets"
    assert seen == [(tmp_path / "sec", "n1")]


def test_racing_fetches_cannot_both_win(tmp_path):
    """The table itself: two checks pass, one redeem wins."""
    tokens = IgnitionTokens(tmp_path / "t.db")
    token, _ = tokens.issue(machine="n1", mac=N1_MAC, group="machine:n1", profile="secret", client=NODE[0])
    a = tokens.check(token, client=NODE[0], mac=None)
    b = tokens.check(token, client=NODE[0], mac=None)
    tokens.redeem(a, client=NODE[0])
    with pytest.raises(TokenRefused) as e:
        tokens.redeem(b, client=NODE[0])
    assert e.value.reason == "reused" and e.value.status == 410
    assert f"already used (by {NODE[0]})" in e.value.message


@pytest.mark.parametrize("meanwhile, reason, says", [
    ("expires", "expired", "expired 1 s ago (it is good for 900 s)"),
    ("is replaced", "superseded", "was replaced by a newer boot script's"),
])  # fmt: skip
def test_a_token_lost_while_its_config_renders_is_refused_for_what_happened(ctl, meanwhile, reason, says):
    # `reused` tells an operator that someone else may hold the secrets: a token that ran out,
    # or that a newer boot script replaced, while its config rendered is not that
    url = ctl.ignition_url(N1_MAC)
    secrets_for = ctl.runtime.provisioning.secrets_for

    def rendering(site, machine):
        if meanwhile == "expires":
            ctl.clock.t += 901  # a slow render, a clock step
        else:
            ctl.runtime.provisioning.tokens.issue(machine="n1", mac=N1_MAC, group="machine:n1",
                                                  profile="secret", client=NODE[0])  # fmt: skip
        return secrets_for(site, machine)

    ctl.runtime.provisioning = dataclasses.replace(ctl.runtime.provisioning, secrets_for=rendering)
    r = ctl.node.get(url)
    assert r.status_code == 410 and says in r.text and "used" not in r.text, r.text
    refused = ctl.events("ignition-token")[-1]["payload"]
    assert (refused["action"], refused["reason"]) == ("refused", reason)


def test_settings_and_serve_options(tmp_path, monkeypatch):
    from bastion.serve_cli import serve
    from bastion.settings import SettingsError
    from click.testing import CliRunner

    site = make_site(tmp_path)
    monkeypatch.setenv("BASTION_IGNITION_TOKEN_TTL", "60")
    assert Settings.build(site, tmp_path / "e.db").ignition_token_ttl == 60
    assert Settings.build(site, tmp_path / "e.db", ignition_token_ttl=5).ignition_token_ttl == 5
    monkeypatch.delenv("BASTION_IGNITION_TOKEN_TTL")
    assert Settings.build(site, tmp_path / "e.db").ignition_token_ttl == 900
    with pytest.raises(SettingsError, match="--ignition-token-ttl 0"):
        Settings.build(site, tmp_path / "e.db", ignition_token_ttl=0)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("BASTION_SECRETS_DIR", raising=False)
    app = create_app(Settings.build(site, tmp_path / "e.db"))
    assert app.state.runtime.secrets.root == tmp_path / "state" / "edge-bastion" / "secrets" / "s"
    app = create_app(Settings.build(site, tmp_path / "e.db", secrets_dir=tmp_path / "x"))
    assert app.state.runtime.secrets.root == tmp_path / "x"
    r = CliRunner().invoke(serve, ["--site", str(site), "--ignition-token-ttl", "-1"])
    assert r.exit_code == 2 and "--ignition-token-ttl -1" in r.output
