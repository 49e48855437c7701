"""The public boot endpoints, as matchbox documents them and as an iPXE client walks them.

Two example sites: examples/matchbox (matchbox's own data-directory layout: profiles, groups with
selectors, a default group and a MAC-specific one) and examples/site (Edge Bastion's YAML).
Through TestClient first, then with curl against a real `bastion serve`, the way a node boots:
/boot.ipxe, the chained /ipxe URL with iPXE's variables filled in, the kernel and initrd from the
script, byte for byte, and (Flatcar) the Ignition URL from the kernel arguments.

Where an expected answer is matchbox's, the comment names where it comes from, in
poseidon/matchbox: docs/api-http.md ("iPXE script", "iPXE", "Ignition Config", "Metadata"),
matchbox/http/ipxe.go, metadata.go, parse.go (collectVariables, labelsFromRequest), ignition.go,
and their _test.go files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urljoin, urlsplit

import pytest
from bastion.site.load import load_site
from bastion_testkit import TOKEN, assert_valid_ignition, auth, curl

NODE1_MAC = "52:54:00:89:d8:10"  # examples/matchbox/groups/node1.json selects it
STRANGER_MAC = "52:54:00:aa:bb:cc"  # in no group: matchbox's default group answers it
MATCHBOX_KERNEL = "/assets/flatcar/current/flatcar_production_pxe.vmlinuz"
MATCHBOX_INITRD = "/assets/flatcar/current/flatcar_production_pxe_image.cpio.gz"

SITE_MACHINES = {  # examples/site/machines.yaml
    "node1": ("52:54:00:12:34:01", "amd64", "flatcar-worker"),
    "node2": ("52:54:00:12:34:02", "amd64", "flatcar-control"),
    "pi1": ("dc:a6:32:01:02:03", "arm64", "flatcar-worker"),
}


# -- an iPXE client, the parts of it these tests need ---------------------------------------------

_IPXE_SETTING = re.compile(r"\$\{([A-Za-z0-9_.-]+)(?::([a-z]+))?\}")


def ipxe_expand(text: str, facts: dict[str, str | None]) -> str:
    """Expand ${name} and ${name:type} as iPXE does: an unset setting expands to nothing,
    `hexhyp` writes a MAC with hyphens, `uristring` percent-encodes all but RFC 3986's
    unreserved characters."""

    def one(m: re.Match) -> str:
        name, kind = m.group(1), m.group(2)
        value = facts.get(name)
        if value is None:
            return ""
        if kind == "hexhyp":
            return value.replace(":", "-")
        if kind == "uristring":
            return quote(value, safe="-_.~")
        return value

    return _IPXE_SETTING.sub(one, text)


def ipxe_script(text: str) -> dict:
    """The kernel line, its arguments and the initrds of a rendered /ipxe script."""
    lines = text.splitlines()
    assert lines[0] == "#!ipxe", text
    assert lines[-1] == "boot", text
    kernel = [line.split() for line in lines if line.startswith("kernel ")]
    assert len(kernel) == 1, text
    initrds = [line.split()[1:] for line in lines if line.startswith("initrd ")]
    return {"kernel": kernel[0][1], "args": kernel[0][2:], "initrd": [w[-1] for w in initrds]}


def chain_target(boot_ipxe: str) -> str:
    """The URL of /boot.ipxe's `chain` command (with iPXE variables still in it)."""
    lines = boot_ipxe.splitlines()
    assert lines[0] == "#!ipxe", boot_ipxe
    chains = [line.split(None, 1)[1] for line in lines if line.startswith("chain ")]
    assert len(chains) == 1, boot_ipxe
    return chains[0]


def env_lines(text: str) -> dict[str, str]:
    """A KEY=value body as a dict; every line must be KEY=value (matchbox metadata_test.go)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {line!r}"
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


def data_url_text(source: str) -> str:
    assert source.startswith("data:,"), source
    return unquote_to_bytes(source[len("data:,") :]).decode()


def files_of(config: dict) -> dict[str, str]:
    return {f["path"]: data_url_text(f["contents"]["source"]) for f in config["storage"]["files"]}


def last_event(client, **filters) -> dict:
    events = client.get("/api/v1/events", params={"limit": 1, **filters}).json()
    assert events, f"no event matching {filters}"
    return events[0]


def matchbox_boot(site: Path, profile: str) -> dict:
    """A matchbox profile's boot section as written (matchbox renders it unchanged)."""
    return json.loads((site / "profiles" / f"{profile}.json").read_text())["boot"]


def matchbox_script(boot: dict) -> str:
    # matchbox/http/ipxe.go: "#!ipxe", then "kernel <kernel> <args...>", the initrds, "boot".
    # matchbox writes all initrds on one `initrd` line; we write one line per initrd, which iPXE
    # reads the same way (each `initrd` command adds an image).
    initrds = "".join(f"initrd {i}\n" for i in boot["initrd"])
    return f"#!ipxe\nkernel {' '.join([boot['kernel'], *boot['args']])}\n{initrds}boot\n"


# -- /boot.ipxe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/boot.ipxe", "/boot.ipxe.0"])
def test_boot_ipxe_chains_to_ipxe_with_matchboxs_variables(path, matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    r = c.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    target = chain_target(r.text)
    # Relative, so iPXE resolves it against the URL it fetched /boot.ipxe from.
    assert target.startswith("ipxe?")
    query = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
    # docs/api-http.md "iPXE script": chain ipxe?uuid=${uuid}&mac=${mac:hexhyp}&domain=${domain}
    # &hostname=${hostname}&serial=${serial}. We ask for :uristring on the free-text ones (a
    # hostname or serial with a space or '&' would otherwise cut the query) and add the build
    # architecture and platform, which select per-arch boot settings.
    assert query["mac"] == "${mac:hexhyp}"
    assert query["uuid"] == "${uuid}"
    for name in ("domain", "hostname", "serial"):
        assert query[name] in (f"${{{name}}}", f"${{{name}:uristring}}")
    assert query["arch"] in ("${buildarch}", "${buildarch:uristring}")
    assert query["platform"] in ("${platform}", "${platform:uristring}")


# -- /ipxe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mac", [NODE1_MAC, "52-54-00-89-D8-10", "5254.0089.d810"])
def test_ipxe_renders_the_mac_specific_groups_profile(mac, matchbox_dir, client_for):
    """Any notation Go's net.ParseMAC reads selects groups/node1.json (matchbox parse.go)."""
    c = client_for(matchbox_dir)
    r = c.get("/ipxe", params={"mac": mac})
    assert r.status_code == 200, r.text
    boot = matchbox_boot(matchbox_dir, "flatcar")
    assert r.text == matchbox_script(boot)
    script = ipxe_script(r.text)
    assert script["kernel"] == MATCHBOX_KERNEL
    assert script["initrd"] == [MATCHBOX_INITRD]
    assert "flatcar.autologin" in script["args"]  # flatcar.json's, not flatcar-install.json's
    assert "console=ttyS0,115200n8" not in script["args"]
    event = last_event(c, kind="boot")
    assert (event["endpoint"], event["status"], event["group"], event["profile"], event["mac"]) == (
        "/ipxe", 200, "node1", "flatcar", NODE1_MAC)  # fmt: skip


@pytest.mark.parametrize(
    "params",
    [{"mac": STRANGER_MAC}, {}, {"mac": "not-a-mac"}, {"uuid": "a1b2c3d4", "hostname": "x"}],
    ids=["unknown-mac", "no-labels", "garbage-mac", "other-labels"],
)
def test_ipxe_for_anything_else_is_the_default_group(params, matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    r = c.get("/ipxe", params=params)
    assert r.status_code == 200, r.text
    assert r.text == matchbox_script(matchbox_boot(matchbox_dir, "flatcar-install"))
    assert last_event(c, kind="boot")["group"] == "default"


@pytest.mark.parametrize(
    "params, group",
    [({"rack": "a"}, "rack-a"), ({"zone": "b"}, "zone-b"), ({"rack": "a", "zone": "b"}, "zone-b"),
     ({"rack": "a", "mac": NODE1_MAC}, "rack-a")],
)  # fmt: skip
def test_ipxe_most_selectors_then_greatest_selector_string(params, group, matchbox_dir, client_for):
    # matchbox storagepb group_test.go TestGroupSort: by selector count, then key=value strings.
    # One selector each: "zone=b" > "rack=a" > "os=installed" > "mac=..."; the README says so.
    c = client_for(matchbox_dir)
    r = c.get("/ipxe", params=params)
    assert r.status_code == 200, r.text
    profile = {"rack-a": "rack", "zone-b": "zone"}[group]
    assert r.text == matchbox_script(matchbox_boot(matchbox_dir, profile))
    assert last_event(c, kind="boot")["group"] == group


def test_ipxe_for_a_profile_without_boot_settings_is_404(matchbox_dir, client_for):
    # matchbox ipxe_test.go TestIPXEHandler_RenderTemplateError: no boot config -> 404.
    c = client_for(matchbox_dir)
    r = c.get("/ipxe", params={"os": "installed"})
    assert r.status_code == 404
    assert "flatcar-installed" in r.text and "no boot settings" in r.text
    event = last_event(c, kind="boot")
    assert (event["status"], event["group"], event["profile"]) == (
        404,
        "installed",
        "flatcar-installed",
    )


# -- /ignition ----------------------------------------------------------------------------------


def test_ignition_for_the_mac_specific_group_uses_its_metadata_and_the_query(
    matchbox_dir, client_for, tmp_path
):
    c = client_for(matchbox_dir)
    query = "mac=52-54-00-89-d8-10&uuid=8a1b2c3d&os=live"
    r = c.get(f"/ignition?{query}")
    assert r.status_code == 200, r.text
    # matchbox render.go writeJSON: Content-Type application/json.
    assert r.headers["content-type"] == "application/json"
    config = r.json()
    assert config["ignition"]["version"].startswith("3.")
    # ignition/flatcar.yaml with matchbox's template data (parse.go collectVariables): the group's
    # metadata, its selectors (mac, normalised), request.raw_query as sent.
    assert files_of(config) == {
        "/etc/hostname": "node1.example.com",
        "/etc/node-info": f"etcd_name=node1\nmac={NODE1_MAC}\nquery={query}\n",
    }
    assert config["passwd"]["users"] == [{
        "name": "core",
        "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyForNode1Only admin@example"],
    }]  # fmt: skip
    assert_valid_ignition(r.text, tmp_path)


def test_ignition_for_anything_else_is_the_default_groups_installer(
    matchbox_dir, client_for, tmp_path
):
    c = client_for(matchbox_dir)
    r = c.get(f"/ignition?mac={STRANGER_MAC.replace(':', '-')}&uuid=u-1")
    assert r.status_code == 200, r.text
    config = r.json()
    installer = files_of(config)["/opt/installer"]
    # the request's labels (mac normalised), each percent-encoded, in single quotes
    # (tests/controller/render/test_matchbox_installer_query.py); default.json's metadata fills
    # the rest.
    assert (
        "curl --retry 10 --fail 'http://matchbox.example.com:8080/ignition?os=installed"
        "&mac=52%3A54%3A00%3Aaa%3Abb%3Acc&uuid=u-1' -o ignition.json\n" in installer
    )
    assert "flatcar-install -d /dev/vda -C stable -i ignition.json" in installer
    assert [u["name"] for u in config["systemd"]["units"]] == ["installer.service"]
    assert_valid_ignition(r.text, tmp_path)


def test_ignition_raw_ign_is_served_for_installed_machines(matchbox_dir, client_for, tmp_path):
    # matchbox ignition.go: an .ign file is raw Ignition, not a template.
    c = client_for(matchbox_dir)
    r = c.get("/ignition", params={"os": "installed", "mac": STRANGER_MAC})
    assert r.status_code == 200, r.text
    raw = json.loads((matchbox_dir / "ignition" / "installed.ign").read_text())
    assert r.json()["systemd"] == raw["systemd"]
    assert_valid_ignition(r.text, tmp_path)


def test_ignition_for_a_profile_without_one_is_404(matchbox_dir, client_for):
    # matchbox ignition.go: no Ignition template for the profile -> http.NotFound.
    c = client_for(matchbox_dir)
    r = c.get("/ignition", params={"rack": "a"})
    assert r.status_code == 404
    assert "'rack'" in r.text and "no Ignition config" in r.text


# -- /metadata ----------------------------------------------------------------------------------


def test_metadata_answers_as_matchbox_documents(matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    query = "mac=52-54-00-89-d8-10&foo=bar&count=3&gate=true"
    r = c.get(f"/metadata?{query}")
    assert r.status_code == 200, r.text
    # matchbox sends "plain/text" (metadata.go; a typo); text/plain is what it means.
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.endswith("\n")
    # docs/api-http.md "Metadata" and metadata_test.go TestMetadataHandler: the group's metadata
    # (nested keys joined by '_'), its selectors, request.query (mac normalised; query values
    # are strings) and request.raw_query, every key upper-cased, one KEY=value per line. Lists
    # are left out: renderAsEnvFile prints only strings, booleans, numbers and maps.
    assert env_lines(r.text) == {
        "HOSTNAME": "node1.example.com",
        "ETCD_NAME": "node1",
        "NODE_INDEX": "1",
        "GATE": "true",
        "NESTED_RACK": "a",
        "NESTED_SLOT": "4",
        "MAC": NODE1_MAC,
        "REQUEST_QUERY_MAC": NODE1_MAC,
        "REQUEST_QUERY_FOO": "bar",
        "REQUEST_QUERY_COUNT": "3",
        "REQUEST_QUERY_GATE": "true",
        "REQUEST_RAW_QUERY": query,
    }


def test_metadata_prints_values_as_go_does(matchbox_dir, client_for):
    # metadata_test.go TestMetadataHandler_MetadataEdgeCases: NUM=3, YES=true, NO=false. JSON
    # numbers decode to float64 and print with %v: 1000000 is 1e+06, 2.5 is 2.5. null is none of
    # the printed types, so it has no line.
    group = {"id": "edge", "profile": "rack", "selector": {"kind": "edge"},
             "metadata": {"num": 3, "yes": True, "no": False, "big": 1000000, "ratio": 2.5,
                          "none": None, "request": "overwritten"}}  # fmt: skip
    (matchbox_dir / "groups" / "edge.json").write_text(json.dumps(group))
    c = client_for(matchbox_dir)
    r = c.get("/metadata?kind=edge")
    assert r.status_code == 200, r.text
    assert env_lines(r.text) == {
        "NUM": "3", "YES": "true", "NO": "false", "BIG": "1e+06", "RATIO": "2.5",
        "KIND": "edge",  # the selector
        # a metadata key "request" is replaced by the request (parse.go: reserved variables)
        "REQUEST_QUERY_KIND": "edge", "REQUEST_RAW_QUERY": "kind=edge",
    }  # fmt: skip


def test_metadata_prints_a_number_beyond_a_float64_as_its_digits(matchbox_dir, client_for):
    # YAML and Python's JSON read integers of any size; matchbox's float64 holds none past
    # 1.8e308, and converting one failed every machine's /metadata with a bare 500
    big = 10**400
    group = {"id": "edge", "profile": "rack", "selector": {"kind": "edge"}, "metadata": {"big": big, "num": 3}}
    (matchbox_dir / "groups" / "edge.json").write_text(json.dumps(group))
    r = client_for(matchbox_dir).get("/metadata?kind=edge")
    assert r.status_code == 200, r.text
    assert env_lines(r.text)["BIG"] == str(big) and env_lines(r.text)["NUM"] == "3"


def test_metadata_for_the_default_group(matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    r = c.get(f"/metadata?mac={STRANGER_MAC}")
    assert r.status_code == 200
    assert env_lines(r.text) == {
        "INSTALL_DEVICE": "/dev/vda",
        "CHANNEL": "stable",
        "REQUEST_QUERY_MAC": STRANGER_MAC,
        "REQUEST_RAW_QUERY": f"mac={STRANGER_MAC}",
    }


# -- no match ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/ipxe", "/ignition", "/metadata", "/generic", "/grub"])
@pytest.mark.parametrize("example", ["matchbox", "site"])
def test_no_matching_group_is_a_clear_404_and_an_event(
    endpoint, example, matchbox_dir, site_dir, client_for
):
    if example == "matchbox":
        site = matchbox_dir
        (site / "groups" / "default.json").unlink()  # else the default group answers everyone
    else:
        site = site_dir  # no default_profile: only declared machines boot
    c = client_for(site)
    r = c.get(endpoint, params={"mac": "02-00-00-00-00-99", "uuid": "u-9"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("no group matches this machine (mac=02:00:00:00:00:99, uuid=u-9)")
    event = last_event(c, kind="boot")
    assert event["endpoint"] == endpoint
    assert event["status"] == 404
    assert event["mac"] == "02:00:00:00:00:99"
    assert (event["machine"], event["group"], event["profile"]) == (None, None, None)
    assert event["payload"]["error"] == "no matching group"
    assert event["payload"]["query"] == "mac=02-00-00-00-00-99&uuid=u-9"
    # and it can be found by the MAC, in any notation
    assert (
        c.get("/api/v1/events", params={"mac": "02:00:00:00:00:99"}).json()[0]["id"] == event["id"]
    )


@pytest.mark.parametrize("path", ["/boot.ipxe", "/ipxe?mac=52-54-00-12-34-01", "/grub/grub.cfg",
                                  "/grub?mac=52-54-00-12-34-01", "/ignition?mac=52-54-00-12-34-01",
                                  "/metadata?mac=52-54-00-12-34-01", "/generic?mac=52-54-00-12-34-01",
                                  "/ipxe?mac=02-00-00-00-00-99"])  # fmt: skip
def test_no_boot_answer_is_kept_by_a_cache(path, site_dir, client_for):
    # Each is one machine's answer of the moment: a one-time URL's token or the secrets behind
    # it, a network boot that install-once turns into a local one, the site as last reloaded.
    # A caching proxy between nodes and the controller that kept one would replay it.
    r = client_for(site_dir).get(path)
    assert r.headers["cache-control"] == "no-store", (path, r.status_code)


# -- every Ignition of every example ----------------------------------------------------------------


def _request_for(group) -> dict[str, str]:
    if not group.selector:
        return {"mac": STRANGER_MAC}  # only the default group matches it
    return {k: v.replace(":", "-") if k == "mac" else v for k, v in group.selector.items()}


@pytest.mark.parametrize("example, expected", [("matchbox", 3), ("site", 3)])
def test_every_rendered_ignition_of_every_example_passes_ignition_validate(
    example, expected, matchbox_dir, site_dir, client_for, tmp_path
):
    site_path = matchbox_dir if example == "matchbox" else site_dir
    site = load_site(site_path)
    c = client_for(site_path)
    rendered = 0
    for group in site.groups:
        profile = site.profiles[group.profile]
        r = c.get("/ignition", params=_request_for(group))
        if not profile.ignition:
            assert r.status_code == 404, (group.id, r.text)
            continue
        assert r.status_code == 200, (group.id, r.text)
        assert last_event(c, kind="boot")["group"] == group.id
        assert_valid_ignition(r.text, tmp_path)
        rendered += 1
        if group.machine is not None:  # the management API's copy is the same config
            api = c.get(f"/api/v1/machines/{group.machine.name}/ignition", headers=auth(TOKEN))
            assert api.status_code == 200, api.text
            assert api.json() == r.json()
    assert rendered == expected


# -- examples/site (Edge Bastion YAML) ----------------------------------------------------------


def expected_flatcar_args(machine: str, base: str) -> list[str]:
    mac, _, _ = SITE_MACHINES[machine]
    return [
        "initrd=flatcar_production_pxe_image.cpio.gz",  # the name iPXE gives the initrd
        "flatcar.first_boot=1",
        f"ignition.config.url={base}/ignition?mac={mac.replace(':', '-')}",
    ]


@pytest.mark.parametrize("machine", sorted(SITE_MACHINES))
def test_site_ipxe_for_a_machine_by_mac_has_the_flatcar_args(machine, site_dir, client_for):
    mac, arch, profile = SITE_MACHINES[machine]
    c = client_for(site_dir)
    r = c.get("/ipxe", params={"mac": mac.upper().replace(":", "-")})
    assert r.status_code == 200, r.text
    script = ipxe_script(r.text)
    assert script["kernel"] == f"/assets/flatcar/{arch}/flatcar_production_pxe.vmlinuz"
    assert script["initrd"] == [f"/assets/flatcar/{arch}/flatcar_production_pxe_image.cpio.gz"]
    # The Flatcar PXE arguments come first, then the profile's own (profiles/*.yaml).
    added = expected_flatcar_args(machine, "http://testserver")
    assert script["args"][:3] == added
    own = {
        ("flatcar-worker", "amd64"): [
            "console=tty0",
            "console=ttyS0,115200n8",
            "flatcar.autologin",
        ],
        ("flatcar-worker", "arm64"): ["console=ttyAMA0,115200n8", "flatcar.autologin"],
        ("flatcar-control", "amd64"): ["console=ttyS0,115200n8"],
    }[(profile, arch)]
    assert script["args"][3:] == own
    # The initrd= name is the basename of the initrd iPXE loads (the EFI stub finds it by it).
    assert script["args"][0] == "initrd=" + script["initrd"][0].rsplit("/", 1)[1]
    event = last_event(c, kind="boot")
    assert (event["machine"], event["profile"], event["group"]) == (
        machine,
        profile,
        f"machine:{machine}",
    )

    # The Ignition URL in the arguments is this machine's config.
    url = script["args"][2].split("=", 1)[1]
    ign = c.get(url.removeprefix("http://testserver"))
    assert ign.status_code == 200, ign.text
    hostname = "pi1.home.arpa" if machine == "pi1" else machine
    assert files_of(ign.json())["/etc/hostname"] == hostname


def test_site_ignition_url_selects_the_same_group_for_a_machine_declared_by_uuid(
    site_dir, client_for, tmp_path
):
    # machines.yaml accepts a uuid instead of a mac. iPXE still sends its MAC: the Ignition URL
    # must carry the UUID too, or Ignition's request matches no group and the node cannot start.
    uuid = "4c4c4544-0042-3510-8052-b4c04f4d4e31"
    with (site_dir / "machines.yaml").open("a") as f:
        f.write(f"\n  - name: node4\n    uuid: {uuid}\n    arch: x86_64\n    role: worker\n")
    c = client_for(site_dir)
    script = ipxe_script(c.get("/ipxe", params={"mac": "52-54-00-12-34-44", "uuid": uuid}).text)
    url = script["args"][2].removeprefix("ignition.config.url=")
    assert url == f"http://testserver/ignition?mac=52-54-00-12-34-44&uuid={uuid}"
    r = c.get(url.removeprefix("http://testserver"))
    assert r.status_code == 200, r.text
    assert files_of(r.json())["/etc/hostname"] == "node4"
    assert last_event(c, kind="boot")["group"] == "machine:node4"
    assert_valid_ignition(r.text, tmp_path)


def test_a_machine_declared_by_uuid_is_named_by_its_reports_and_beats(site_dir, client_for):
    # its config knows the UUID (machine.uuid, the uuid= of its Ignition URL), not a MAC of
    # machines.yaml: the MAC it sends is whichever it booted with
    uuid = "4c4c4544-0042-3510-8052-b4c04f4d4e31"
    with (site_dir / "machines.yaml").open("a") as f:
        f.write(f"\n  - name: node4\n    uuid: {uuid}\n    arch: x86_64\n    role: worker\n")
    c = client_for(site_dir)
    r = c.post("/callback", data={"mac": "52:54:00:12:34:44", "uuid": uuid, "stage": "booted"})
    assert r.status_code == 200 and r.json()["machine"] == "node4"
    assert last_event(c, kind="callback")["machine"] == "node4"
    beat = {"mac": "52:54:00:12:34:44", "uuid": uuid, "node": "node4",
            "boot_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}  # fmt: skip
    r = c.post("/heartbeat", data=beat)
    assert r.status_code == 200 and r.json()["recorded"] is True
    assert last_event(c, kind="heartbeat")["machine"] == "node4"
    # a boot answered by a group that is not the machine's own still names it
    (site_dir / "groups").mkdir()
    group = {"id": "installed", "profile": "flatcar-worker", "selector": {"uuid": uuid, "os": "installed"}}
    (site_dir / "groups" / "installed.json").write_text(json.dumps(group))
    c = client_for(site_dir)
    params = {"mac": "52-54-00-12-34-44", "uuid": uuid, "os": "installed"}
    assert c.get("/ipxe", params=params).status_code == 200
    event = last_event(c, kind="boot")
    assert (event["group"], event["machine"]) == ("installed", "node4")


def _group_ignition(site_dir, client_for, gid, selector, params):
    """A matchbox group with a Flatcar profile: the Ignition URL of its /ipxe script, and what
    that URL answers (its group's config)."""
    group = {"id": gid, "profile": "flatcar-worker", "selector": selector,
             "metadata": {"ssh_authorized_keys": [f"ssh-ed25519 AAAAC3Nza {gid}"],
                          "k3s_url": "https://10.77.0.12:6443", "timezone": "UTC"}}  # fmt: skip
    (site_dir / "groups").mkdir()
    (site_dir / "groups" / f"{gid}.json").write_text(json.dumps(group))
    c = client_for(site_dir)
    r = c.get("/ipxe", params=params)
    assert r.status_code == 200, r.text
    url = ipxe_script(r.text)["args"][2].removeprefix("ignition.config.url=")
    r = c.get(url.removeprefix("http://testserver"))
    assert r.status_code == 200, r.text
    assert last_event(c, kind="boot")["group"] == gid
    assert r.json()["passwd"]["users"][0]["sshAuthorizedKeys"] == [f"ssh-ed25519 AAAAC3Nza {gid}"]
    return url, r


def test_site_ignition_url_selects_the_same_group_for_a_group_of_labels(
    site_dir, client_for, tmp_path
):
    # A matchbox group (selector: labels) with a Flatcar profile: same rule, the labels ride along.
    url, r = _group_ignition(site_dir, client_for, "rack-c", {"rack": "c d"},
                             {"mac": "02-00-00-00-00-0c", "rack": "c d", "hostname": "n"})  # fmt: skip
    assert url == "http://testserver/ignition?mac=02-00-00-00-00-0c&rack=c%20d"
    assert_valid_ignition(r.text, tmp_path)


def test_site_ignition_url_keeps_the_groups_spelling_of_the_mac_key(site_dir, client_for, tmp_path):
    # A selector's key `MAC` matches a request's `MAC` (matchbox compares keys as written): the
    # URL wrote the MAC as `mac=`, and Ignition's request matched no group (404)
    url, r = _group_ignition(site_dir, client_for, "upmac", {"MAC": "52:54:00:00:00:09", "rack": "r1"},
                             {"MAC": "52-54-00-00-00-09", "rack": "r1"})  # fmt: skip
    assert url == "http://testserver/ignition?MAC=52-54-00-00-00-09&rack=r1"
    assert_valid_ignition(r.text, tmp_path)


def test_site_controller_url_is_the_ignition_url_base(site_dir, client_for):
    text = (site_dir / "site.yaml").read_text()
    (site_dir / "site.yaml").write_text(
        text.replace(
            "# controller_url: http://10.77.0.1:8080", "controller_url: http://10.77.0.1:8080"
        )
    )
    c = client_for(site_dir)
    script = ipxe_script(c.get("/ipxe", params={"mac": "52:54:00:12:34:01"}).text)
    assert (
        "ignition.config.url=http://10.77.0.1:8080/ignition?mac=52-54-00-12-34-01" in script["args"]
    )


def test_site_metadata_for_a_machine(site_dir, client_for):
    c = client_for(site_dir)
    r = c.get("/metadata", params={"mac": "dc-a6-32-01-02-03"})
    assert r.status_code == 200, r.text
    env = env_lines(r.text)
    # the machine's own metadata wins over site.yaml's; its selector is its MAC
    assert env["TIMEZONE"] == "Europe/Berlin"
    assert env["K3S_URL"] == "https://10.77.0.12:6443"
    assert (env["MAC"], env["NAME"], env["HOSTNAME"], env["ARCH"]) == (
        "dc:a6:32:01:02:03", "pi1", "pi1.home.arpa", "arm64")  # fmt: skip
    assert env["LABELS_BOARD"] == "rpi4"
    assert env["REQUEST_RAW_QUERY"] == "mac=dc-a6-32-01-02-03"


# -- the iPXE sequence with curl against a real `bastion serve` ---------------------------------------


def curl_get(url: str) -> bytes:
    r = curl("--fail", "--globoff", url)
    assert r.returncode == 0, f"curl {url}: {r.stderr.decode()}"
    return r.stdout


def boot_like_ipxe(server, facts: dict[str, str | None], tmp_path: Path) -> dict:
    """What iPXE does after DHCP handed it <server>/boot.ipxe: run it, chain, load, boot."""
    boot_url = server.url + "/boot.ipxe"
    chained = urljoin(boot_url, ipxe_expand(chain_target(curl_get(boot_url).decode()), facts))
    script_text = curl_get(chained).decode()
    script = ipxe_script(ipxe_expand(script_text, facts))
    loaded = {}
    for i, url in enumerate([script["kernel"], *script["initrd"]]):
        absolute = urljoin(chained, url)
        out = tmp_path / f"download-{i}"
        r = curl("--fail", "--globoff", "-o", str(out), absolute)
        assert r.returncode == 0, f"curl {absolute}: {r.stderr.decode()}"
        loaded[urlsplit(absolute).path] = out.read_bytes()
    return {"chained": chained, "script": script, "loaded": loaded}


def assert_loaded_the_assets(site: Path, loaded: dict[str, bytes]) -> None:
    assert loaded
    for path, data in loaded.items():
        assert path.startswith("/assets/")
        on_disk = (site / "assets" / path.removeprefix("/assets/")).read_bytes()
        assert len(data) == len(on_disk) and data == on_disk, path


def test_ipxe_sequence_with_curl_matchbox(matchbox_dir, serve, tmp_path):
    server = serve(matchbox_dir)
    facts = {"mac": NODE1_MAC, "uuid": "8a1b2c3d-0000-4000-8000-000000000001", "buildarch": "x86_64",
             "platform": "efi", "serial": "SN 42&x", "hostname": None, "domain": None}  # fmt: skip
    run = boot_like_ipxe(server, facts, tmp_path)
    query = dict(parse_qsl(urlsplit(run["chained"]).query, keep_blank_values=True))
    assert query["mac"] == "52-54-00-89-d8-10"
    assert query["uuid"] == facts["uuid"]
    assert query["serial"] == "SN 42&x"  # uristring kept the '&' inside the value
    assert query["hostname"] == "" and query["domain"] == ""  # unset settings expand to nothing
    assert run["script"]["kernel"] == MATCHBOX_KERNEL
    # the profile's own arguments, with iPXE's variables now filled in
    assert (
        "flatcar.config.url=http://matchbox.example.com:8080/ignition"
        f"?uuid={facts['uuid']}&mac=52-54-00-89-d8-10"
    ) in run["script"]["args"]
    assert set(run["loaded"]) == {MATCHBOX_KERNEL, MATCHBOX_INITRD}
    assert_loaded_the_assets(matchbox_dir, run["loaded"])

    events = server.get("/api/v1/events", params={"limit": 10}).json()
    steps = [(e["kind"], e["endpoint"], e["status"]) for e in reversed(events)]
    assert steps[-4:] == [
        ("boot", "/boot.ipxe", 200), ("boot", "/ipxe", 200),
        ("asset", MATCHBOX_KERNEL, 200), ("asset", MATCHBOX_INITRD, 200),
    ]  # fmt: skip
    ipxe_event = next(e for e in events if e["endpoint"] == "/ipxe")
    assert (ipxe_event["group"], ipxe_event["profile"], ipxe_event["mac"]) == (
        "node1",
        "flatcar",
        NODE1_MAC,
    )
    assert ipxe_event["payload"]["client"] == "127.0.0.1"


@pytest.mark.parametrize("machine, buildarch", [("node1", "x86_64"), ("pi1", "arm64")])
def test_ipxe_sequence_with_curl_site(machine, buildarch, site_dir, serve, tmp_path):
    mac, arch, _ = SITE_MACHINES[machine]
    server = serve(site_dir)
    facts = {"mac": mac, "uuid": None, "buildarch": buildarch, "platform": "efi"}
    run = boot_like_ipxe(server, facts, tmp_path)
    args = run["script"]["args"]
    assert args[:3] == expected_flatcar_args(machine, server.url)
    assert set(run["loaded"]) == {
        f"/assets/flatcar/{arch}/flatcar_production_pxe.vmlinuz",
        f"/assets/flatcar/{arch}/flatcar_production_pxe_image.cpio.gz",
    }
    assert_loaded_the_assets(site_dir, run["loaded"])

    # Flatcar boots; Ignition fetches the URL from its kernel arguments.
    url = args[2].split("=", 1)[1]
    config = curl_get(url)
    assert_valid_ignition(config.decode(), tmp_path)
    files = files_of(json.loads(config))
    assert files["/etc/hostname"] == ("pi1.home.arpa" if machine == "pi1" else machine)
    event = server.get("/api/v1/events", params={"limit": 1, "kind": "boot"}).json()[0]
    assert (event["endpoint"], event["machine"], event["status"]) == ("/ignition", machine, 200)


def test_curl_sequence_for_an_unknown_machine_stops_at_a_404(site_dir, serve, tmp_path):
    server = serve(site_dir)
    boot_url = server.url + "/boot.ipxe"
    facts = {"mac": "02:00:00:00:00:42", "buildarch": "x86_64", "platform": "pcbios"}
    chained = urljoin(boot_url, ipxe_expand(chain_target(curl_get(boot_url).decode()), facts))
    out = tmp_path / "body"
    r = curl("--globoff", "-o", str(out), "-w", "%{http_code}", chained)
    assert r.stdout == b"404"
    assert out.read_text().startswith(
        "no group matches this machine (arch=x86_64, mac=02:00:00:00:00:42"
    )
    event = server.get("/api/v1/events", params={"mac": "02:00:00:00:00:42"}).json()[0]
    assert (event["endpoint"], event["status"], event["payload"]["error"]) == (
        "/ipxe",
        404,
        "no matching group",
    )
