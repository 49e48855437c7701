"""Install-once (bastion.state.install): a machine whose profile says `install: once` network-boots
until it reports its first boot on /callback, then boots its local disk until
`bastion machine reprovision NAME` (POST /api/v1/machines/{name}/reprovision)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bastion.state.install import InstallMarks, local_grub, local_ipxe, reports_success
from bastion.site.load import SiteError, load_site
from bastion_testkit import TOKEN, auth, write_assets
from click.testing import CliRunner

ONCE_MAC = "52:54:00:00:01:01"
ALWAYS_MAC = "52:54:00:00:01:02"
KERNEL = "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz"

LOCAL_IPXE = """\
#!ipxe
# Edge Bastion: n1 is installed (install: once): boot from its local disk.
# `bastion machine reprovision n1` makes it network-boot again.
echo n1 is installed: booting from the local disk
iseq ${platform} efi && exit 1 ||
sanboot --no-describe --drive 0x80 || exit 1
"""


def make_site(root: Path, install: str = "once") -> Path:
    site = root / "site"
    (site / "profiles").mkdir(parents=True)
    (site / "site.yaml").write_text("site: s\nroles:\n  once: once\n  always: always\n")
    (site / "machines.yaml").write_text(
        "machines:\n"
        f"  - name: n1\n    mac: {ONCE_MAC}\n    role: once\n"
        f"  - name: n2\n    mac: {ALWAYS_MAC}\n    role: always\n"
    )
    body = f"kernel: {KERNEL}\ninitrd:\n  - /assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz\n"
    (site / "profiles" / "once.yaml").write_text(body + f"install: {install}\n")
    (site / "profiles" / "always.yaml").write_text(body)
    write_assets(site, ("flatcar/amd64",))
    return site


def events(client, kind: str) -> list[dict]:
    return list(reversed(client.get("/api/v1/events", params={"kind": kind}).json()))


def test_the_whole_cycle(tmp_path, client_for):
    client = client_for(make_site(tmp_path))
    ipxe = client.get("/ipxe", params={"mac": ONCE_MAC, "platform": "efi"})
    assert ipxe.status_code == 200 and ipxe.text.startswith(f"#!ipxe\nkernel {KERNEL} ")
    assert client.get("/api/v1/machines/n1").json()["boots_from"] == "network"

    # a failed report and a report of another stage change nothing
    for fields in ({"stage": "booted", "status": "failed"}, {"stage": "ignition"}):
        r = client.post("/callback", data={"mac": ONCE_MAC, **fields})
        assert r.status_code == 200 and "installed" not in r.json()
    assert client.get("/ipxe", params={"mac": ONCE_MAC}).text.startswith("#!ipxe\nkernel ")

    r = client.post("/callback", data={"mac": ONCE_MAC, "stage": "booted"})
    assert r.json() == {"ok": True, "event": r.json()["event"], "machine": "n1", "installed": True}
    callback_event = r.json()["event"]
    ipxe = client.get("/ipxe", params={"mac": ONCE_MAC, "platform": "efi"})
    assert ipxe.status_code == 200 and ipxe.text == LOCAL_IPXE
    grub = client.get("/grub", params={"mac": ONCE_MAC})
    assert grub.status_code == 200 and grub.text == local_grub("n1") and "exit 1" in grub.text
    boot = events(client, "boot")[-1]
    assert boot["endpoint"] == "/grub" and boot["payload"]["boot"] == "local-disk"
    m = client.get("/api/v1/machines/n1").json()
    assert m["install"] == "once" and m["boots_from"] == "local-disk" and m["installed_at"] > 0
    listed = {x["name"]: x for x in client.get("/api/v1/machines").json()}
    assert listed["n1"]["boots_from"] == "local-disk" and listed["n2"]["boots_from"] == "network"

    # a second report is not a second transition
    client.post("/callback", json={"mac": ONCE_MAC, "stage": "installed", "status": "ok"})
    installs = events(client, "install")
    assert [(e["machine"], e["payload"]["state"], e["payload"]["callback"]) for e in installs] == [
        ("n1", "installed", callback_event)
    ]

    # reprovision: the token, then the machine network-boots again
    assert client.post("/api/v1/machines/n1/reprovision").status_code == 401
    r = client.post("/api/v1/machines/n1/reprovision", headers=auth())
    assert r.status_code == 200 and r.json()["changed"] is True and r.json()["boots_from"] == "network"
    assert r.json()["was_installed_at"] == m["installed_at"]
    assert client.get("/ipxe", params={"mac": ONCE_MAC}).text.startswith(f"#!ipxe\nkernel {KERNEL} ")
    r = client.post("/api/v1/machines/n1/reprovision", headers=auth())
    assert r.json()["changed"] is False and r.json()["event"] is None
    installs = events(client, "install")
    assert [(e["payload"]["state"], e["source"]) for e in installs] == [
        ("installed", "controller"), ("provisioning", "api")
    ]  # fmt: skip


def test_only_install_once_profiles_and_declared_machines_are_marked(tmp_path, client_for):
    client = client_for(make_site(tmp_path))
    r = client.post("/callback", data={"mac": ALWAYS_MAC, "stage": "booted"})
    assert "installed" not in r.json()
    r = client.post("/callback", data={"mac": "52:54:00:99:99:99", "stage": "booted"})
    assert r.json()["machine"] is None and "installed" not in r.json()
    assert events(client, "install") == []
    assert client.get("/ipxe", params={"mac": ALWAYS_MAC}).text.startswith("#!ipxe\nkernel ")


def test_reprovision_errors(tmp_path, client_for):
    client = client_for(make_site(tmp_path))
    r = client.post("/api/v1/machines/nope/reprovision", headers=auth())
    assert r.status_code == 404 and r.json()["detail"] == "no machine 'nope' in machines.yaml"
    assert client.post("/api/v1/machines/n1/reprovision", headers=auth("wrong-token-0123456789")).status_code == 401
    no_token = client_for(make_site(tmp_path / "b"), token=None)
    assert no_token.post("/api/v1/machines/n1/reprovision").status_code == 403


def test_the_mark_survives_a_restart_and_a_profile_change(tmp_path, client_for):
    site = make_site(tmp_path)
    first = client_for(site)
    db = first.app.state.runtime.settings.db_path
    first.post("/callback", data={"mac": ONCE_MAC, "stage": "booted"})
    from bastion_testkit import make_app
    from fastapi.testclient import TestClient

    again = TestClient(make_app(site, db))
    assert again.get("/ipxe", params={"mac": ONCE_MAC}).text == LOCAL_IPXE
    # with `install: always` the mark is kept but not used: the machine network-boots
    (site / "profiles" / "once.yaml").write_text((site / "profiles" / "once.yaml").read_text().replace(
        "install: once", "install: always"))  # fmt: skip
    third = TestClient(make_app(site, db))
    assert third.get("/ipxe", params={"mac": ONCE_MAC}).text.startswith("#!ipxe\nkernel ")
    assert third.get("/api/v1/machines/n1").json()["boots_from"] == "network"
    assert InstallMarks(db).get("n1").callback is not None


def test_an_installed_machine_is_not_issued_a_token(tmp_path, client_for):
    site = make_site(tmp_path)
    (site / "ignition").mkdir()
    (site / "ignition" / "s.bu").write_text(
        "variant: flatcar\nversion: 1.0.0\nstorage:\n  files:\n    - path: /etc/t\n"
        "      contents:\n        inline: {{ secrets.x }}\n"
    )
    with (site / "profiles" / "once.yaml").open("a") as f:
        f.write("ignition: s.bu\n")
    machines = site / "machines.yaml"  # a machine whose Ignition reads secrets has its address
    machines.write_text(
        machines.read_text().replace("    role: once\n", "    role: once\n    address: 10.77.0.21\n")
    )
    client = client_for(site, client=("10.77.0.21", 40000))
    assert "ignition?token=" in client.get("/ipxe", params={"mac": ONCE_MAC}).text
    client.post("/callback", data={"mac": ONCE_MAC, "stage": "booted"})
    assert client.get("/ipxe", params={"mac": ONCE_MAC}).text == LOCAL_IPXE
    assert [e["payload"]["action"] for e in events(client, "ignition-token")] == ["issued"]


def test_the_profile_option_is_checked(tmp_path):
    site = make_site(tmp_path, install="sometimes")
    with pytest.raises(SiteError) as e:
        load_site(site)
    assert any("profiles/once.yaml" in p and "install" in p for p in e.value.problems), e.value.problems
    loaded = load_site(make_site(tmp_path / "ok"))
    assert loaded.profiles["once"].install == "once" and loaded.profiles["always"].install == "always"


@pytest.mark.parametrize(
    "fields, ok",
    [
        ({"stage": "booted"}, True),
        ({"stage": "installed", "status": "OK"}, True),
        ({"stage": "booted", "status": "success"}, True),
        ({"stage": "booted", "status": "failed"}, False),
        ({"stage": "ignition", "status": "ok"}, False),
        ({}, False),
    ],
)
def test_what_counts_as_a_successful_first_boot(fields, ok):
    assert reports_success(fields) is ok


def test_the_scripts(tmp_path):
    assert local_ipxe("n1") == LOCAL_IPXE
    grub = local_grub("n1")
    assert 'if [ "${grub_platform}" = "efi" ]; then\n    exit 1\n' in grub and "chainloader +1" in grub


def test_the_cli_through_a_running_controller(tmp_path, serve, monkeypatch):
    """`bastion machine list/status/reprovision` against a real `bastion serve`, with the token."""
    from bastion.machine_cli import machine_group

    server = serve(make_site(tmp_path))
    import httpx

    httpx.post(f"{server.url}/callback", data={"mac": ONCE_MAC, "stage": "booted"}).raise_for_status()
    runner = CliRunner()
    monkeypatch.delenv("BASTION_API_TOKEN_FILE", raising=False)
    monkeypatch.delenv("BASTION_API_TOKEN", raising=False)
    r = runner.invoke(machine_group, ["list", "--url", server.url], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "installed" in r.output and "boots its local disk" in r.output and "install: always" in r.output
    r = runner.invoke(machine_group, ["status", "n1", "--url", server.url, "--json"])
    assert json.loads(r.output)["boots_from"] == "local-disk"
    r = runner.invoke(machine_group, ["reprovision", "n1", "--url", server.url])
    assert r.exit_code == 1 and "a bearer token is required (HTTP 401)" in r.output
    monkeypatch.setenv("BASTION_API_TOKEN", TOKEN)
    r = runner.invoke(machine_group, ["reprovision", "n1", "--url", server.url])
    assert r.exit_code == 0 and "its next boot is a network boot" in r.output, r.output
    r = runner.invoke(machine_group, ["reprovision", "ghost", "--url", server.url])
    assert r.exit_code == 1 and "no machine 'ghost' in machines.yaml (HTTP 404)" in r.output
    r = runner.invoke(machine_group, ["status", "n1", "--url", server.url])
    assert "next boot: not installed yet: network boot (install: once)" in r.output
    assert httpx.get(f"{server.url}/ipxe", params={"mac": ONCE_MAC}).text.startswith("#!ipxe\nkernel ")


def test_the_docs_show_the_script_as_served():
    from bastion_testkit import REPO

    assert local_ipxe("node1") in (REPO / "docs" / "controller.md").read_text()
