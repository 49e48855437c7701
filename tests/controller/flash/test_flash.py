"""Flashing: device.json rendered from the site, and `bastion flash` with the real mpremote
against a running sim board (the firmware on the MicroPython unix port behind a PTY), with its
relay outputs watched the whole time."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bastion.flash import image as flashing
from bastion.device.link import DeviceLink
from bastion.site.load import SiteError, load_site
from simkit import RelayWatch, SimProcess, bastion, free_udp_port, mpremote

from firmware.config import Config

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "flashing.md"

SITE_YAML = """\
site: flash-test
controller_url: http://127.0.0.1:8080/
default_profile: plain
device:
  ip: 10.77.0.2
  boot_files:
    0: undionly.kpxe
    7: snponly.efi
  tftp:
    max_transfers: 2
  power:
    stagger_ms: 300
    defaults:
      min_off_ms: 2000
      default: off
    channels:
      node-b: {max_cycles: 2}
      5: {window_ms: 60000}
"""

MACHINES_YAML = """\
machines:
  - name: node-a
    mac: 52:54:00:00:00:0a
    relay: 0
  - name: node-b
    mac: 52-54-00-00-00-0B
    relay: 3
  - name: node-c
    mac: 52:54:00:00:00:0c
"""


def make_site(root: Path, site_yaml: str = SITE_YAML, machines_yaml: str = MACHINES_YAML) -> Path:
    (root / "profiles").mkdir(parents=True)
    (root / "profiles" / "plain.yaml").write_text(
        "os: custom\nkernel: http://127.0.0.1:8080/assets/vmlinuz\n"
    )
    (root / "site.yaml").write_text(site_yaml)
    (root / "machines.yaml").write_text(machines_yaml)
    return root


def small_tftp(root: Path) -> Path:
    """Stand-ins for the iPXE binaries: the copy over a PTY moves ~16 KB/s."""
    root.mkdir(parents=True)
    (root / "undionly.kpxe").write_bytes(b"u" * 700)
    (root / "snponly.efi").write_bytes(b"s" * 1500)
    (root / "pi").mkdir()
    (root / "pi" / "config.txt").write_text("arm_64bit=1\n")
    return root


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


SIM = flashing.board_definition("sim")


# --- the renderer ------------------------------------------------------------------------------


def test_machines_on_relays_name_the_channels_and_the_site_gives_the_rest(tmp_path):
    site = load_site(make_site(tmp_path / "site"))
    dev = flashing.render_device_config(site, SIM)
    chan = {"min_off_ms": 2000, "default": "off"}
    assert dev.config == {
        "server_ip": "10.77.0.2",
        "script_url": "http://127.0.0.1:8080/boot.ipxe",
        "boot_files": {"0": "undionly.kpxe", "7": "snponly.efi"},
        "allowed_macs": ["52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"],
        "tftp": {"max_transfers": 2},
        "power": {
            "stagger_ms": 300,
            "channels": [
                {"name": "node-a", **chan},
                {"name": "ch1", **chan},
                {"name": "ch2", **chan},
                {"name": "node-b", **chan, "max_cycles": 2},
                {"name": "ch4", **chan},
                {"name": "ch5", **chan, "window_ms": 60000},
                {"name": "ch6", **chan},
                {"name": "ch7", **chan},
            ],
        },
    }
    assert dev.channel_names[:4] == ["node-a", "ch1", "ch2", "node-b"]
    # What the device will read: the firmware's own checker takes it.
    cfg = Config(json.loads(dev.to_json()))
    assert cfg.allowed_macs == {bytes.fromhex("52540000000" + c) for c in "abc"}
    assert cfg.boot_files == {0: "undionly.kpxe", 7: "snponly.efi"}


def test_defaults_answer_only_the_site_and_boot_the_ipxe_builds(tmp_path):
    site = load_site(make_site(tmp_path / "s", "default_profile: plain\ndevice:\n  ip: 10.0.0.9\n"))
    dev = flashing.render_device_config(site, SIM, "http://10.0.0.1:8080")
    assert dev.config["boot_files"] == {
        "0": "undionly.kpxe", "6": "ipxe.efi", "7": "ipxe.efi", "9": "ipxe.efi"}  # fmt: skip
    assert dev.config["script_url"] == "http://10.0.0.1:8080/boot.ipxe"
    assert len(dev.config["allowed_macs"]) == 3
    assert dev.config["power"] == {"channels": [{"name": n} for n in dev.channel_names]}
    assert "rpi" not in dev.config and "tftp" not in dev.config  # the firmware's defaults rule


def test_the_example_site_renders(tmp_path):
    site = load_site(REPO / "examples" / "site")
    dev = flashing.render_device_config(site, SIM, "http://10.77.0.1:8080")
    assert dev.channel_names[:3] == ["node1", "node2", "pi1"]
    assert dev.config["server_ip"] == "10.77.0.2"


W5500 = flashing.board_definition("w5500-evb-pico")


@pytest.mark.parametrize("net, rendered, how", [
    ("  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1}\n",
     {"ip": "10.77.0.2/24", "gateway": "10.77.0.1"}, "static"),
    ("  net: {ip: 10.77.0.2/16, gateway: 10.77.200.1, dns: 9.9.9.9}\n",
     {"ip": "10.77.0.2/16", "gateway": "10.77.200.1", "dns": "9.9.9.9"}, "static"),
    ("  net: {dhcp: true, dhcp_wait_ms: 30000}\n", {"dhcp_wait_ms": 30000}, "dhcp"),
    ("  net: {dhcp: true}\n", None, "dhcp"),
    ("", None, "dhcp"),
])  # fmt: skip
def test_the_devices_network_is_rendered_for_the_board_layer(tmp_path, net, rendered, how):
    """site.yaml device.net -> device.json net, as firmware/netconfig.py (what a real board's
    board_net brings its Ethernet up with) reads it."""
    from firmware.netconfig import net_settings

    site = load_site(make_site(tmp_path / "site", SITE_YAML.replace("  boot_files:\n", net + "  boot_files:\n")))
    dev = flashing.render_device_config(site, W5500)
    assert dev.config.get("net") == rendered
    got = net_settings(json.loads(dev.to_json()))
    assert got.how == how
    if how == "static":
        assert (got.ip, got.gateway) == ("10.77.0.2", rendered["gateway"])
        assert got.dns == rendered.get("dns", rendered["gateway"])
    assert dev.warnings == []


def test_the_sim_board_says_it_ignores_the_devices_network(tmp_path):
    text = SITE_YAML.replace("  boot_files:\n", "  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1}\n  boot_files:\n")
    dev = flashing.render_device_config(load_site(make_site(tmp_path / "site", text)), SIM)
    assert dev.config["net"] == {"ip": "10.77.0.2/24", "gateway": "10.77.0.1"}
    assert dev.warnings == [("site.yaml: device.net: board sim takes the host's network as it "
                             "is and ignores it (it is for a real board's Ethernet)")]


# (edit of SITE_YAML: old, new; the text on the line the error names; the field; the error)
BAD_DEVICE = [
    ("ip: 10.77.0.2", "ip: 10.77.0.300", "ip:", "device.ip", "'10.77.0.300' is not an IPv4 address"),
    ("  ip: 10.77.0.2\n", "  ip: 10.77.0.2\n  answer: all\n", "answer:", "device.answer",
     "must be 'site' or 'any', not 'all'"),
    ("max_transfers: 2", "max_transfers: 99", "max_transfers:", "device.tftp.max_transfers",
     "less than or equal to 16"),
    ("max_transfers: 2", "max_transfers: yes", "max_transfers:", "device.tftp.max_transfers",
     "must be an integer, not True"),
    ("7: snponly.efi", "efi: snponly.efi", "0: undionly", "device.boot_files",
     "'efi' is not a client architecture"),
    ("7: snponly.efi", "7: ../../etc/passwd", "0: undionly", "device.boot_files",
     "must be a file name under tftp/"),
    # names TFTP itself refuses as "bad file name": every request for them would be refused
    ("7: snponly.efi", "7: 'efi\\\\snponly.efi'", "0: undionly", "device.boot_files",
     "a TFTP name is printable ASCII without a backslash"),
    ("7: snponly.efi", "7: snpönly.efi", "0: undionly", "device.boot_files",
     "a TFTP name is printable ASCII without a backslash"),
    ("default: off", "default: maybe", "default:", "device.power.defaults.default",
     "must be 'on' or 'off', not 'maybe'"),
    ("min_off_ms: 2000", "min_off_ms: 2s", "min_off_ms:", "device.power.defaults.min_off_ms",
     "must be an integer, not '2s'"),
    ("  tftp:\n", "  tfpt:\n", "max_transfers:", "device.tfpt", "is not a known field"),
    ("  ip: 10.77.0.2\n", "", "boot_files:", "device.ip", "is required"),
    ("  tftp:\n", "  net: {ip: 10.77.0.2}\n  tftp:\n", "ip: 10.77.0.2}", "device.net.ip",
     "'10.77.0.2' must be an IPv4 address and its prefix length, e.g. 192.168.1.11/24"),
    ("  tftp:\n", "  net: {ip: 10.77.0.2/31, gateway: 10.77.0.3}\n  tftp:\n", "net:",
     "device.net.ip", "the prefix length must be 8..30"),
    ("  tftp:\n", "  net: {ip: 10.77.0.2/24}\n  tftp:\n", "net:", "device.net",
     "ip needs gateway (the router's address, in the same subnet)"),
    ("  tftp:\n", "  net: {ip: 10.77.0.2/24, gateway: 10.78.0.1}\n  tftp:\n", "net:",
     "device.net", "gateway 10.78.0.1 is not in 10.77.0.2/24"),
    ("  tftp:\n", "  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1, dhcp: true}\n  tftp:\n",
     "net:", "device.net", "give ip (a static address) or dhcp: true, not both"),
    ("  tftp:\n", "  net: {gateway: 10.77.0.1}\n  tftp:\n", "net:", "device.net",
     "gateway is for a static address: give ip too, or drop it"),
    ("  tftp:\n", "  net: {ip: 10.77.0.9/24, gateway: 10.77.0.1}\n  tftp:\n", "ip: 10.77.0.2",
     "device", "net.ip 10.77.0.9/24 is not ip 10.77.0.2: the device serves from its own address"),
    ("  tftp:\n", "  net: {dhcp_wait_ms: 500}\n  tftp:\n", "net:", "device.net.dhcp_wait_ms",
     "greater than or equal to 1000"),
]  # fmt: skip


@pytest.mark.parametrize("old, new, at, field, says", BAD_DEVICE,
                         ids=[f"{b[3]}={b[1].strip()}" for b in BAD_DEVICE])  # fmt: skip
def test_a_bad_device_field_is_one_error_naming_file_line_and_field(
    tmp_path, old, new, at, field, says
):
    text = SITE_YAML.replace(old, new, 1)
    assert text != SITE_YAML
    with pytest.raises(SiteError) as e:
        load_site(make_site(tmp_path / "site", text))
    assert len(e.value.problems) == 1, e.value.problems
    problem = e.value.problems[0]
    line = text[: text.index(at)].count("\n") + 1
    assert problem.startswith(f"site.yaml:{line}: {field}: "), problem
    assert says in problem, problem


# (site.yaml, machines.yaml, controller URL given, what the error says)
BAD_RENDER = [
    (SITE_YAML, MACHINES_YAML.replace("relay: 3", "relay: 9"), None,
     "machines.yaml:5: machines[1].relay: channel 9, but board sim has 8 relay channels (0..7)"),
    (SITE_YAML.replace("node-b: {", "node-x: {"), MACHINES_YAML, None,
     "site.yaml: device.power.channels.node-x: no machine 'node-x'"),
    (SITE_YAML.replace("node-b: {", "node-c: {"), MACHINES_YAML, None,
     "site.yaml: device.power.channels.node-c: machine 'node-c' has no relay: in machines.yaml"),
    (SITE_YAML.replace("      5: {", "      9: {"), MACHINES_YAML, None,
     "site.yaml: device.power.channels.9: board sim has no relay channel 9"),
    (SITE_YAML.replace("      5: {", "      3: {"), MACHINES_YAML, None,
     "site.yaml: device.power.channels.3: channel 3 (node-b) is already set"),
    (SITE_YAML, "machines:\n  - name: n\n    uuid: 12345678-1234-1234-1234-123456789abc\n", None,
     "site.yaml: device.answer: 'site' answers only the MACs in machines.yaml and no machine has one"),
    (SITE_YAML.replace("controller_url: http://127.0.0.1:8080/\n", ""), MACHINES_YAML, None,
     "site.yaml: controller_url: is not set: give it there or with --controller-url"),
    (SITE_YAML, MACHINES_YAML, "10.0.0.1:8080", "--controller-url: '10.0.0.1:8080' is not an http(s) URL"),
    ("default_profile: plain\n", MACHINES_YAML, "http://x", "site.yaml: device: is missing"),
    (SITE_YAML, MACHINES_YAML.replace("node-c\n", "ch5\n    relay: 1\n"), None,
     "machines.yaml:8: machines[2].name: 'ch5' is also the name of unused relay channel 5"),
]  # fmt: skip


@pytest.mark.parametrize(
    "site_yaml, machines_yaml, url, says", BAD_RENDER, ids=[b[3][:50] for b in BAD_RENDER]
)
def test_what_only_the_renderer_can_see_is_reported_against_the_site_files(
    tmp_path, site_yaml, machines_yaml, url, says
):
    site = load_site(make_site(tmp_path / "site", site_yaml, machines_yaml))
    with pytest.raises(flashing.FlashError) as e:
        flashing.render_device_config(site, SIM, url)
    assert any(p.startswith(says) for p in e.value.problems), e.value.problems


def test_a_machine_without_a_mac_is_a_warning_when_answering_only_the_site(tmp_path):
    machines = MACHINES_YAML + "  - name: node-d\n    uuid: 12345678-1234-1234-1234-123456789abc\n"
    site = load_site(make_site(tmp_path / "site", SITE_YAML, machines))
    dev = flashing.render_device_config(site, SIM)
    says = "machines.yaml:10: machines[3]: node-d has no mac, so the device will not answer it"
    assert dev.warnings == [says + " (device.answer: site)"]


# --- the relay outputs a restart brings -------------------------------------------------------


def _device(channels: list[dict]) -> str:
    return json.dumps({"power": {"channels": channels}})


EVERY_DEVICE_FIELD = """\
site: every-field
controller_url: http://10.77.0.3:8080
default_profile: plain
device:
  ip: 10.77.0.2
  answer: site
  boot_files: {0: undionly.kpxe, 7: snponly.efi}
  next_server: 10.77.0.3
  rpi: {boot: true, menu: Pi, next_server: 10.77.0.3}
  tftp: {max_transfers: 2, max_blksize: 1024, timeout_ms: 500, retries: 3, max_window: 2}
  power:
    stagger_ms: 100
    defaults: {min_off_ms: 1000, max_cycles: 3, window_ms: 60000, default: on}
    channels:
      node-a: {min_off_ms: 2000, max_cycles: 2, window_ms: 30000, default: off}
  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1, dns: 10.77.0.1, dhcp_wait_ms: 5000}
"""


def test_every_device_field_the_site_can_set_renders_keys_the_firmware_knows(tmp_path):
    """The firmware refuses a device.json key it does not know: everything the site schema can
    set must come out under a name it reads (a field added to the schema belongs here too)."""
    from bastion.site.schema import DeviceChannel, DeviceNet, DevicePower, DeviceRpi, DeviceTftp

    site = load_site(make_site(tmp_path / "s", EVERY_DEVICE_FIELD))
    dev = flashing.render_device_config(site, W5500)
    c = dev.config
    assert set(c["rpi"]) == set(DeviceRpi.model_fields)
    assert set(c["tftp"]) == set(DeviceTftp.model_fields)
    assert set(c["net"]) == set(DeviceNet.model_fields) - {"dhcp"}  # dhcp is "no ip"
    assert set(c["power"]) == set(DevicePower.model_fields) - {"defaults"}
    assert set(c["power"]["channels"][0]) == {"name", *DeviceChannel.model_fields}
    assert c["next_server"] == "10.77.0.3" and c["allowed_macs"]


@pytest.mark.parametrize("where, value, says", [
    ((), {"alowed_macs": []}, "alowed_macs: unknown key (did you mean allowed_macs?)"),
    (("tftp",), {"max_windw": 8}, "tftp.max_windw: unknown key (did you mean max_window?)"),
    (("rpi",), {"bot": False}, "rpi.bot: unknown key (did you mean boot?)"),
    (("net",), {"gatway": "10.77.0.1"}, "net.gatway: unknown key (did you mean gateway?)"),
    (("power",), {"stager_ms": 5}, "power.stager_ms: unknown key (did you mean stagger_ms?)"),
    (("power", "channels", 2), {"defualt": "on"},
     "power.channels[2].defualt: unknown key (did you mean default?)"),
])  # fmt: skip
def test_a_key_the_firmware_does_not_know_is_refused_before_flashing(tmp_path, where, value, says):
    site = load_site(make_site(tmp_path / "s"))
    config = flashing.render_device_config(site, SIM).config
    node = config
    for k in where:
        node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
    node.update(value)
    with pytest.raises(flashing.FlashError) as e:
        flashing.check_device_config(config, SIM)
    assert str(e.value) == f"device.json (from site.yaml device:): {says}"


def test_flash_refuses_a_device_json_the_firmware_would_refuse_and_writes_nothing(
    tmp_path, monkeypatch
):
    """A renderer that wrote a key the firmware does not know (a controller bug: site.yaml's
    schema refuses unknown keys itself) is stopped with the firmware's words, nothing written."""
    from bastion.flash.cli import flash
    from click.testing import CliRunner

    real = flashing._drop_none
    monkeypatch.setattr(flashing, "_drop_none",
                        lambda d: {**real(d), **({"max_windw": 8} if "max_window" in d else {})})  # fmt: skip
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    r = CliRunner().invoke(flash, ["--sim", str(tmp_path / "flash"), "--site", str(site),
                                   "--tftp-dir", str(tftp)])  # fmt: skip
    assert r.exit_code != 0
    assert "tftp.max_windw: unknown key (did you mean max_window?)" in r.output
    assert not (tmp_path / "flash").exists()


@pytest.mark.parametrize("pins, says", [
    ((9, 9), "relays.channels[3] and [5] are both on pin 9"),
    ((9, "GP9"), "relays.channels[3] and [5] are both on pin 9 ('GP9')"),
])  # fmt: skip
def test_a_board_with_two_relays_on_one_pin_is_refused(pins, says):
    d = W5500.defn
    d["relays"]["channels"][3]["pin"], d["relays"]["channels"][5]["pin"] = pins
    with pytest.raises(flashing.FlashError) as e:
        flashing.checked_board("x", "boards/x.json", json.dumps(d).encode())
    assert str(e.value) == f"boards/x.json: board.json: {says}"


def test_restored_outputs_follow_the_persisted_state_then_the_defaults():
    board = SIM.data
    on3 = _device([{"name": f"n{i}", "default": "on" if i == 3 else "off"} for i in range(8)])
    assert flashing.restored_outputs(None, None, board) == [False] * 8
    assert flashing.restored_outputs(None, on3, board) == [i == 3 for i in range(8)]
    # persisted state wins over any default
    assert flashing.restored_outputs("01000000\n", on3, board) == [i == 1 for i in range(8)]
    # a broken state file: the firmware falls back to the defaults
    assert flashing.restored_outputs("garbage", on3, board) == [i == 3 for i in range(8)]
    # more channels than the board: the firmware restores every channel with its defaults
    nine = _device([{"default": "on"}] * 9)
    assert flashing.restored_outputs(None, nine, board) == [False] * 8


def test_relay_changes_name_the_channel():
    changes = flashing.relay_changes([False, True], [True, True], ["a", "b"])
    assert changes == [
        "relay channel 0 (a) is off now and the new configuration would restore it on"
    ]


# --- bastion flash ------------------------------------------------------------------------------


def test_boot_files_the_next_server_would_not_have_are_a_warning(tmp_path):
    # device.next_server sends every client to another host for its boot files: flashing said
    # nothing when the site's tftp/ (what `serve --tftp` serves) had none of them
    site = make_site(tmp_path / "site", SITE_YAML.replace("  ip: 10.77.0.2\n",
                                                          "  ip: 10.77.0.2\n  next_server: 10.77.0.1\n"))
    r = bastion("flash", "--sim", str(tmp_path / "flash"), "--site", str(site), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("device.next_server is 10.77.0.1: clients fetch their boot files from there, not from "
            "the device, and the site's tftp/") in r.stderr
    assert "has none for architecture 0 (undionly.kpxe), 7 (snponly.efi)" in r.stderr
    (site / "tftp").mkdir()
    for name in ("undionly.kpxe", "snponly.efi"):
        (site / "tftp" / name).write_bytes(b"MZ")
    r = bastion("flash", "--sim", str(tmp_path / "flash"), "--site", str(site), "--dry-run")
    assert "device.next_server is" not in r.stderr


def test_dry_run_renders_and_lists_without_touching_the_port(tmp_path):
    site = make_site(tmp_path / "site")
    port = tmp_path / "ttyACM9"
    port.write_bytes(b"")
    r = bastion("flash", "--port", str(port), "--board", "sim", "--site", str(site), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"script_url": "http://127.0.0.1:8080/boot.ipxe"' in r.stdout
    assert "tftp/ipxe.efi" in r.stdout and "tftp/undionly.kpxe" in r.stdout  # /usr/lib/ipxe
    assert "the device was not contacted" in r.stdout
    assert port.read_bytes() == b""


@pytest.mark.parametrize("args, says", [
    (["--port", "/dev/ttyNOPE9", "--board", "sim"], "no such port /dev/ttyNOPE9"),
    (["--port", "/dev/null", "--board", "pdp11"], "unknown board 'pdp11'"),
    (["--port", "/dev/null"], "--port needs --board NAME"),
    (["--sim", "x", "--port", "/dev/null"], "give --port (a board's serial line) or --sim DIR"),
])  # fmt: skip
def test_usage_errors_are_clear(tmp_path, args, says):
    r = bastion("flash", "--site", str(make_site(tmp_path / "site")), *args)
    assert r.returncode != 0
    assert says in r.stderr, r.stderr


def test_an_invalid_site_is_reported_with_its_problems(tmp_path):
    site = make_site(tmp_path / "site", SITE_YAML.replace("ip: 10.77.0.2", "ip: nope"))
    r = bastion("flash", "--sim", str(tmp_path / "flash"), "--site", str(site))
    assert r.returncode != 0
    assert f"the site in {site} does not load:" in r.stderr
    assert "site.yaml:5: device.ip: 'nope' is not an IPv4 address" in r.stderr
    assert not (tmp_path / "flash").exists()


def test_mpremote_failing_shows_what_it_said(tmp_path):
    site = make_site(tmp_path / "site")
    r = bastion("flash", "--port", "/dev/null", "--board", "sim", "--site", str(site),
                "--tftp-dir", str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    assert r.returncode != 0
    assert "mpremote failed while reading the device's flash (exit 1)" in r.stderr, r.stderr
    assert "mpremote: failed to access /dev/null" in r.stderr, r.stderr


def test_mpremote_tracebacks_are_cut_to_what_went_wrong():
    # mpremote's own traceback (two dozen lines of its frames, as CPython prints them) came
    # through whole; so did a board's (MicroPython's), which mpremote relays.
    from bastion.flash.cli import mpremote_said
    from bastion.flash.sim import micropython_bin

    own = subprocess.run([sys.executable, "-c", "class TransportError(Exception): pass\n"
                          "def enter(): raise TransportError('could not enter raw repl')\n"
                          "def main(): return enter()\nmain()"],
                         capture_output=True, text=True).stderr  # fmt: skip
    board = subprocess.run([micropython_bin(), "-c", "import os\nos.mkdir('/proc/x')"],
                           capture_output=True, text=True).stdout  # fmt: skip
    assert own.count("\n") > 3 and "Traceback (most recent call last):" in board
    said = mpremote_said(f"b''\n{own}".strip())
    assert said.splitlines() == [
        "b''", "TransportError: could not enter raw repl",
        "(the device did not answer mpremote's Ctrl-C/Ctrl-A: the firmware hung, or the line is "
        "not a MicroPython board's; reset the board and flash again)"]
    said = mpremote_said(f"cp x :y\n{board.strip()}")
    assert said.splitlines()[:2] == ["cp x :y", "OSError: [Errno 2] ENOENT"], said


@pytest.fixture
def board(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0") as s:
        yield s


def test_flashing_a_running_board_restarts_it_with_the_site_and_never_switches_a_relay(
    tmp_path, board
):
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        assert link.request("status")["power"][3]["name"] == "ch3"
        link.request("power", channel=3, state="on")
        wait_for(lambda: (flash / "relays.state").read_text().strip() == "00010000", what="relay 3")
        old_boot = link.boot
    persisted = (flash / "power.state").read_bytes(), (flash / "power.state").stat().st_mtime_ns
    watch = RelayWatch(flash)
    try:
        r = bastion("flash", "--port", str(board.link), "--board", "sim", "--site", str(site),
                    "--tftp-dir", str(tftp))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"flashed {board.link}" in r.stdout
        assert "relays: unchanged by the restart (on: node-b)" in r.stdout
        assert "boot: firmware" in r.stdout and "serving dhcp, tftp" in r.stdout
        # the firmware restarted: a new boot, with the site's channel names
        ev = board.wait(lambda e: e.get("ev") == "boot" and e.get("boot") != old_boot)
        assert "error" not in ev, ev
        with DeviceLink(str(board.link), timeout_s=10) as link:
            assert link.wait_ready(15), link.last_error
            assert link.boot != old_boot
            power = link.request("status")["power"]
        assert [c["name"] for c in power[:4]] == ["node-a", "ch1", "ch2", "node-b"]
        assert power[3]["output"] == "on" and power[3]["desired"] == "on"
        # what is on the flash now, as mpremote sees it
        listing = mpremote(board.link, "fs", "ls", ":")
        for name in ("main.py", "board.json", "device.json", "firmware/", "tftp/"):
            assert re.search(rf"\s{re.escape(name)}$", listing, re.MULTILINE), listing
        assert ".bastion-new" not in listing and ".bastion-old" not in listing
        tftp_ls = mpremote(board.link, "fs", "ls", ":tftp")
        assert "snponly.efi" in tftp_ls and "undionly.kpxe" in tftp_ls and "pi/" in tftp_ls
        fw = mpremote(board.link, "fs", "ls", ":firmware")
        assert "main.mpy" in fw and "power.mpy" in fw and ".py\n" not in fw
    finally:
        seen = watch.stop()
    assert seen == ["00010000"], seen  # the output never changed, at any moment
    assert (
        (flash / "power.state").read_bytes(),
        (flash / "power.state").stat().st_mtime_ns,
    ) == persisted
    device = json.loads((flash / "device.json").read_text())
    assert device["power"]["channels"][3]["name"] == "node-b"
    assert (flash / "tftp" / "pi" / "config.txt").read_text() == "arm_64bit=1\n"


def test_a_line_a_controller_holds_is_refused_before_anything_is_sent(tmp_path, board, serve):
    # `serve --device` on the same line took the firmware's answers: flash said "no answer
    # (firmware not running?)", stopped the firmware, and mpremote failed with a traceback.
    site = make_site(tmp_path / "site")
    server = serve(site, device=str(board.link))
    wait_for(lambda: server.get("/api/v1/device").json().get("connected"), what="serve holds the line")
    r = bastion("flash", "--port", str(board.link), "--board", "sim", "--site", str(site))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"{board.link} is open in another program" in r.stderr
    assert f"PID {server.proc.pid}: " in r.stderr and " serve " in r.stderr
    assert "no answer" not in r.stdout  # nothing was sent: the firmware was never asked
    assert not [e for e in board.seen if e.get("ev") == "reset"]
    server.stop()  # the line is free: the same command flashes
    r = bastion("flash", "--port", str(board.link), "--board", "sim", "--site", str(site),
                "--tftp-dir", str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_flashing_again_copies_only_what_changed(tmp_path, board):
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    args = ["flash", "--port", str(board.link), "--board", "sim", "--site", str(site),
            "--tftp-dir", str(tftp)]  # fmt: skip
    first = bastion(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    (tftp / "snponly.efi").write_bytes(b"new")
    again = bastion(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"^  1 of \d+ files differ", again.stdout, re.MULTILINE), again.stdout
    in_place = [line for line in again.stdout.splitlines() if "in place:" in line]
    assert in_place == ["  in place: tftp/snponly.efi (3 B)"], again.stdout
    assert (tmp_path / "flash" / "tftp" / "snponly.efi").read_bytes() == b"new"


def test_a_default_that_would_switch_a_relay_at_restart_is_refused(tmp_path, board):
    flash = tmp_path / "flash"
    # node-b (channel 3) has nothing persisted; the site now wants it on when nothing is.
    site = make_site(
        tmp_path / "site", SITE_YAML.replace("node-b: {max_cycles: 2}", "node-b: {default: on}")
    )
    before = (flash / "device.json").read_bytes()
    watch = RelayWatch(flash)
    r = bastion("flash", "--port", str(board.link), "--board", "sim", "--site", str(site),
                "--tftp-dir", str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    seen = watch.stop()
    assert r.returncode != 0
    assert (
        "relay channel 3 (node-b) is off now and the new configuration would restore it on"
        in r.stderr
    )
    assert "refusing to flash" in r.stderr
    assert (flash / "device.json").read_bytes() == before
    assert not (flash / "power.state").exists()
    assert seen in (["<missing>"], ["00000000"]), seen
    # the old firmware was started again
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        assert link.request("status")["power"][3]["name"] == "ch3"


def test_a_channel_mid_cycle_is_refused_before_the_firmware_is_stopped(tmp_path, board):
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        link.request("power", channel=2, state="on")
        link.request("power", channel=2, state="cycle", off_ms=60000)
        boot = link.boot
    r = bastion("flash", "--port", str(board.link), "--board", "sim", "--site",
                str(make_site(tmp_path / "site")), "--tftp-dir", str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    assert r.returncode != 0
    assert "relay channel 2 (ch2) is cycling" in r.stderr, r.stderr
    assert "mpremote" not in r.stdout, r.stdout
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        assert link.boot == boot  # the firmware kept running
        assert link.request("status")["power"][2]["cycling"] is True


# --- bastion flash --sim ------------------------------------------------------------------------


class SimDir:
    """`bastion sim --flash DIR --no-install`: runs what is in DIR as it is."""

    def __init__(self, flash: Path, link: Path):
        self.link = link
        self.proc = subprocess.Popen(
            [str(BIN / "bastion"), "sim", "--flash", str(flash), "--no-install",
             "--listen", "127.0.0.1", "--dhcp-port", str(free_udp_port()),
             "--pxe-port", str(free_udp_port()), "--tftp-port", str(free_udp_port()),
             "--serial-link", str(link)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.events: list[dict] = []

    def boot_event(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            ev = json.loads(line) if line.startswith("{") else {}
            self.events.append(ev)
            if ev.get("ev") == "boot":
                return ev
            assert time.monotonic() < deadline, self.events
        raise AssertionError(f"bastion sim exited: {self.events}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_sim_flash_dir_boots_with_no_install(tmp_path):
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    r = bastion("flash", "--sim", str(flash), "--site", str(site), "--tftp-dir",
                str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in flash.iterdir()) == [
        "board.json", "device.json", "firmware", "main.py", "tftp"]  # fmt: skip
    assert json.loads((flash / "board.json").read_text())["name"] == "sim"
    sim = SimDir(flash, tmp_path / "tty")
    try:
        ev = sim.boot_event()
        assert "error" not in ev and ev["services"] == ["dhcp", "tftp"], ev
        restored = [e["name"] for e in sim.events if e.get("ev") == "power"]
        assert restored[:4] == ["node-a", "ch1", "ch2", "node-b"]
    finally:
        sim.stop()


def test_sim_flash_refuses_a_relay_switch_and_writes_nothing(tmp_path):
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    tftp = str(small_tftp(tmp_path / "tftp"))
    assert (
        bastion("flash", "--sim", str(flash), "--site", str(site), "--tftp-dir", tftp).returncode
        == 0
    )
    (flash / "relays.state").write_text("00000001\n")  # as the firmware left channel 7: on
    (flash / "power.state").write_text("0000000\n")  # persisted for 7 channels only
    before = (flash / "device.json").read_bytes()
    r = bastion("flash", "--sim", str(flash), "--site", str(site), "--tftp-dir", tftp)
    assert r.returncode != 0
    assert (
        "relay channel 7 (ch7) is on now and the new configuration would restore it off" in r.stderr
    )
    assert (flash / "device.json").read_bytes() == before
    assert (flash / "relays.state").read_text() == "00000001\n"
    assert (flash / "power.state").read_text() == "0000000\n"


# --- docs/flashing.md ---------------------------------------------------------------------------


def doc_commands() -> list[list[str]]:
    """Each `bastion flash` command in docs/flashing.md, as arguments."""
    return [shlex.split(line.strip())[1:] for line in DOC.read_text().splitlines()
            if line.strip().startswith("bastion flash ")]  # fmt: skip


def test_the_commands_in_the_doc_work(tmp_path):
    """--sim commands run as written (paths moved into tmp_path); --port ones as --dry-run."""
    from bastion.flash import chainload

    if not (chainload.DEFAULT_GRUB_MODULES / "linux.mod").is_file() or not shutil.which(
        "grub-mkimage"
    ):
        # examples/site has an arm64 machine: its flash builds the GRUB arm64 chainloader
        pytest.skip(f"no GRUB arm64 modules in {chainload.DEFAULT_GRUB_MODULES} or no "
                    "grub-mkimage (tools/build-grub-arm64)")  # fmt: skip
    commands = doc_commands()
    assert any("--sim" in c for c in commands) and any("--port" in c for c in commands)
    port = tmp_path / "ttyACM0"
    port.write_bytes(b"")
    for args in commands:
        args = [a.replace("/tmp/bastion-flash", str(tmp_path / "flash"))
                .replace("/dev/ttyACM0", str(port)).replace("/tmp/ttyPICO", str(port))
                for a in args]  # fmt: skip
        if "--port" in args:
            args.append("--dry-run")
        args = [str(REPO / a) if a.startswith(("examples/", "boards/")) else a for a in args]
        r = bastion(*args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    assert (tmp_path / "flash" / "device.json").exists()


# --- the .mpy ABI and free space (bastion.flash.image) ---------------------------------------


def _compile(tmp_path: Path, source: str, *options: str) -> bytes:
    """A real mpy-cross's output for source (options: -march=..., -X emit=native)."""
    from bastion.flash.sim import _tool

    src = tmp_path / "m.py"
    src.write_text(source)
    out = tmp_path / "m.mpy"
    subprocess.run([_tool("mpy-cross"), *options, "-o", str(out), str(src)], check=True)
    return out.read_bytes()


def _image(tmp_path: Path, mpy: bytes) -> flashing.Image:
    return flashing.Image({"firmware/main.mpy": mpy, "firmware/power.mpy": mpy, "main.py": b""})


def _impl(version: str = "1.24.1", mpy: int | None = 4870, platform: str = "rp2") -> dict:
    return {"name": "micropython", "version": [int(x) for x in version.split(".")], "mpy": mpy,
            "machine": None, "platform": platform, "maxsize": 2**31 - 1}  # fmt: skip


def test_sys_implementation_mpy_decodes_as_the_board_files_say():
    for name in ("w5500-evb-pico", "w5100s-evb-pico", "olimex-esp32-poe"):
        mpy = flashing.board_definition(name).defn["micropython"]["mpy"]
        abi = flashing.MpyAbi.from_sys(mpy["sys_implementation_mpy"])
        assert (abi.version, abi.sub_version, abi.arch) == (
            mpy["version"], mpy["sub_version"], mpy["arch"])  # fmt: skip
    # the unix port from PyPI this suite runs the sim board on: 6.3, x64
    assert str(flashing.MpyAbi.from_sys(2822)) == "6.3 x64"


def test_bytecode_loads_on_every_board_with_its_major_version(tmp_path):
    image = _image(tmp_path, _compile(tmp_path, "x = 1\n"))
    header = flashing.MpyAbi.from_header(image.files["firmware/main.mpy"])
    assert (header.version, header.arch, str(header)) == (6, None, "6")
    for name, impl in (("w5500-evb-pico", _impl()),
                       ("olimex-esp32-poe", _impl("1.25.0", 11014, "esp32"))):  # fmt: skip
        assert flashing.abi_check(impl, image, flashing.board_definition(name)) == ([], [])


def test_native_code_for_another_architecture_is_refused(tmp_path):
    mpy = _compile(tmp_path, "@micropython.native\ndef f():\n    return 1\n", "-march=x64")
    assert flashing.MpyAbi.from_header(mpy).arch == "x64"
    problems, _ = flashing.abi_check(_impl(), _image(tmp_path, mpy), W5500)
    assert "have native code for x64, and it runs armv6m" in problems[0], problems


def test_an_unlisted_release_that_loads_the_files_is_a_warning(tmp_path):
    image = _image(tmp_path, _compile(tmp_path, "x = 1\n"))
    problems, warnings = flashing.abi_check(_impl("1.23.0"), image, W5500)
    assert problems == []
    assert warnings == [(
        "the device runs MicroPython 1.23.0, not one of the releases known to work on board "
        "w5500-evb-pico (1.24.0, 1.24.1, 1.25.0, 1.26.0, 1.26.1, 1.27.0, 1.28.0); its .mpy ABI "
        "(6.3 armv6m) loads the firmware, but nothing else about it has been checked")]  # fmt: skip


def test_no_mpy_import_or_another_port_is_refused(tmp_path):
    image = _image(tmp_path, _compile(tmp_path, "x = 1\n"))
    problems, _ = flashing.abi_check(_impl(mpy=None), image, W5500)
    assert "which cannot import .mpy files (sys.implementation has no _mpy)" in problems[0]
    problems, _ = flashing.abi_check(_impl("1.25.0", 11014, "esp32"), image, W5500)
    assert problems[0].startswith(
        "the device runs micropython 1.25.0 for the 'esp32' port, and board w5500-evb-pico is "
        "MicroPython's 'rp2' port (W5500_EVB_PICO): is it another board?")  # fmt: skip


def test_space_is_counted_per_file_in_whole_blocks_while_the_old_files_are_still_there():
    todo = {"tftp/a": b"x", "tftp/pi/b": b"x" * 4096, "device.json": b"x" * 4097}
    probe = {"space": [4096, 100, 9], "sizes": {"tftp/a": 9000, "device.json": 10},
             "firmware": {"main.mpy": 5000}}  # fmt: skip
    plan = flashing.space_plan(todo, probe, swap=False, stage=".bastion-new")
    assert plan.files == {"tftp/a": 1, "tftp/pi/b": 1, "device.json": 2}
    assert plan.dirs == 3  # .bastion-new, .bastion-new/tftp, .bastion-new/tftp/pi
    assert plan.need == 4 + 3 * flashing.DIR_BLOCKS and not plan.fits
    assert plan.free_after == 9 - 4 + 3 + 1  # tftp/a (3 blocks) and device.json (1) replaced
    swapped = flashing.space_plan(todo, probe, swap=True, stage=".bastion-new")
    assert swapped.freed == plan.freed + 2  # the old firmware, 2 blocks, goes too
    fits = flashing.space_plan({"device.json": b"{}"}, probe, swap=False, stage=".bastion-new")
    assert fits.need == 1 + 2 and fits.fits
    problems = plan.refusal().problems
    assert problems[0] == (
        "the device's filesystem has 36.0 KB free (9 blocks of 4.0 KB), and the copy needs "
        "40.0 KB (10 blocks: 4 for 3 files, each rounded up to whole blocks, 6 for 3 "
        "directories), while the files it replaces are still there")  # fmt: skip
    assert problems[1] == "the largest: device.json (8.0 KB), tftp/a (4.0 KB), tftp/pi/b (4.0 KB)"
    assert flashing.space_plan(todo, {"space": None}, False, ".bastion-new") is None


def test_the_bastion_sim_commands_in_the_doc_have_their_options():
    """`bastion sim` lines start a board that runs until stopped: their options are checked."""
    lines = [shlex.split(line.strip()) for line in DOC.read_text().splitlines()
             if line.strip().startswith("bastion sim ")]  # fmt: skip
    assert any("--dress-as" in words for words in lines)
    for words in lines:
        r = bastion(*[w for w in words[1:] if w != "&"], "--help")
        assert r.returncode == 0, (words, r.stdout + r.stderr)
