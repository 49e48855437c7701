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


NUC_UUID = "4c4c4544-0035-4a10-8031-b3c04f4a3232"


def declared_by_uuid(site: Path) -> Path:
    """n1 declared by its UUID alone: recognised by it whatever MAC it boots with."""
    machines = site / "machines.yaml"
    machines.write_text(machines.read_text().replace(f"mac: {ONCE_MAC}\n", f"uuid: {NUC_UUID}\n"))
    return site


def test_a_machine_declared_by_its_uuid_alone_is_marked_installed(tmp_path, client_for):
    # iPXE sends the UUID with whatever MAC the machine booted with; its config can send it
    # back (machine.uuid, or the uuid= its Ignition URL carries)
    client = client_for(declared_by_uuid(make_site(tmp_path)))
    boot = {"mac": "52-54-00-aa-bb-cc", "uuid": NUC_UUID, "platform": "efi"}
    assert client.get("/ipxe", params=boot).text.startswith(f"#!ipxe\nkernel {KERNEL} ")
    report = {"mac": "52:54:00:aa:bb:cc", "uuid": NUC_UUID.upper(), "stage": "booted"}
    r = client.post("/callback", data=report)
    assert r.status_code == 200 and r.json()["machine"] == "n1" and r.json()["installed"] is True
    assert client.get("/ipxe", params=boot).text == LOCAL_IPXE
    assert client.get("/api/v1/machines/n1").json()["boots_from"] == "local-disk"
    (installed,) = events(client, "install")
    assert (installed["machine"], installed["payload"]["state"]) == ("n1", "installed")
    # a report with the UUID alone names it too
    r = client.post("/callback", json={"uuid": NUC_UUID, "stage": "booted"})
    assert r.json() == {"ok": True, "event": r.json()["event"], "machine": "n1", "installed": True}


def test_a_uuid_names_only_a_machine_declared_by_its_uuid_alone(tmp_path, client_for):
    # machines.yaml: a machine with a MAC is recognised by it, as its boot requests are
    site = make_site(tmp_path)
    machines = site / "machines.yaml"
    machines.write_text(machines.read_text().replace(f"mac: {ALWAYS_MAC}\n",
                                                     f"mac: {ALWAYS_MAC}\n    uuid: {NUC_UUID}\n"))  # fmt: skip
    client = client_for(site)
    r = client.post("/callback", data={"mac": "52:54:00:99:99:99", "uuid": NUC_UUID, "stage": "booted"})
    assert r.status_code == 200 and r.json()["machine"] is None


def test_a_mark_counts_only_for_the_hardware_and_profile_it_was_made_for(tmp_path, client_for):
    site = make_site(tmp_path)
    (site / "profiles" / "once2.yaml").write_text((site / "profiles" / "once.yaml").read_text())
    client = client_for(site)
    client.post("/callback", data={"mac": ONCE_MAC, "stage": "booted"})
    assert client.get("/ipxe", params={"mac": ONCE_MAC, "platform": "efi"}).text == LOCAL_IPXE
    machines = site / "machines.yaml"

    def declare(old: str, new: str) -> None:
        machines.write_text(machines.read_text().replace(old, new))
        assert client.post("/api/v1/reload", headers=auth()).json()["error"] is None

    # n1's board dies and another takes its name: its disk is blank, so it installs
    new_mac = "52:54:00:00:01:99"
    declare(f"mac: {ONCE_MAC}\n", f"mac: {new_mac}\n")
    assert client.get("/ipxe", params={"mac": new_mac}).text.startswith(f"#!ipxe\nkernel {KERNEL} ")
    # and the API and the operator say so: it boots from the network, it is not Provisioned
    assert client.get("/api/v1/machines/n1").json()["boots_from"] == "network"
    status = {m["name"]: m for m in client.get("/api/v1/operator").json()["machines"]}["n1"]["status"]
    assert "installed" not in status["text"], status
    r = client.post("/callback", data={"mac": new_mac, "stage": "booted"})
    assert r.json()["installed"] is True
    assert client.get("/ipxe", params={"mac": new_mac, "platform": "efi"}).text == LOCAL_IPXE
    assert InstallMarks(client.app.state.runtime.settings.db_path).get("n1").mac == new_mac
    # moved to another install-once profile: what is on its disk is not that profile's
    declare("    role: once\n", "    profile: once2\n")
    assert client.get("/ipxe", params={"mac": new_mac}).text.startswith(f"#!ipxe\nkernel {KERNEL} ")
    client.post("/callback", data={"mac": new_mac, "stage": "booted"})
    assert client.get("/ipxe", params={"mac": new_mac, "platform": "efi"}).text == LOCAL_IPXE
    assert [(e["payload"]["state"], e["mac"], e["profile"]) for e in events(client, "install")] == [
        ("installed", ONCE_MAC, "once"), ("installed", new_mac, "once"), ("installed", new_mac, "once2")
    ]  # fmt: skip


def test_a_machine_declared_by_its_uuid_installs_again_on_another_board(tmp_path, client_for):
    site = declared_by_uuid(make_site(tmp_path))
    client = client_for(site)
    client.post("/callback", data={"uuid": NUC_UUID, "stage": "booted"})
    other = "4c4c4544-0035-4a10-8031-b3c04f4a9999"
    machines = site / "machines.yaml"
    machines.write_text(machines.read_text().replace(NUC_UUID, other))
    assert client.post("/api/v1/reload", headers=auth()).json()["error"] is None
    boot = {"mac": "52-54-00-aa-bb-cc", "uuid": other}
    assert client.get("/ipxe", params=boot).text.startswith(f"#!ipxe\nkernel {KERNEL} ")


def test_a_mark_of_an_older_controller_still_counts(tmp_path, client_for):
    # marks made before they recorded a UUID (the column is new): upgrading the controller must
    # not reinstall every installed machine
    import sqlite3

    site = make_site(tmp_path)
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as old:
        old.execute("CREATE TABLE machine_installed (machine TEXT PRIMARY KEY, installed_at REAL NOT NULL,"
                    " mac TEXT, profile TEXT, callback INTEGER)")  # fmt: skip
        old.execute("INSERT INTO machine_installed VALUES ('n1', 1.0, ?, 'once', 7)", (ONCE_MAC,))
    old.close()
    from bastion_testkit import make_app
    from fastapi.testclient import TestClient

    client = TestClient(make_app(site, db))
    assert client.get("/ipxe", params={"mac": ONCE_MAC, "platform": "efi"}).text == LOCAL_IPXE
    assert InstallMarks(db).get("n1").uuid is None
