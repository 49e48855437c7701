"""The lab end to end (marker `lab`): real OVMF and SeaBIOS nodes in QEMU boot through the
firmware on the sim board (proxyDHCP + TFTP) and the controller, powered by the device's
relays, inside network namespaces this test builds and removes. Asserts on the real trace."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bastion.lab import trace
from bastion.lab.lab import Lab, beating_node, default_nodes
from bastion.lab.netns import namespaces, pid_running

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
NAME, PREFIX = "ebt", "10.78.0"


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _need_root()
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("lab"))
    try:
        lab.up([*default_nodes(), beating_node()], progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


def _pids(lab: Lab) -> dict[str, int]:
    return dict(lab.procs.pids)


def test_uefi_node_pxe_boots_through_the_device_to_its_callback(lab):
    r = lab.boot("uefi-1", timeout=400, progress=lambda msg: None)
    assert r.ok, r.problems
    by = {s.stage: s for s in r.steps}
    assert list(by)[0] == "power on"
    # The device's proxy offer to edk2: boot file by arch 7, no address handed out.
    offer = trace.first(r.steps, "proxy offer", "boot file ipxe.efi")
    assert offer is not None and offer.event["payload"]["arch"] == 7
    assert offer.event["payload"]["ipxe"] is False and offer.event["machine"] == "uefi-1"
    # The real TFTP read of ipxe.efi (after edk2's tsize probe), whole and clean.
    ends = [s for s in r.steps if s.stage == "tftp end" and "ipxe.efi" in s.detail]
    assert ends and ends[-1].event["payload"]["result"] == "ok"
    assert ends[-1].event["payload"]["bytes"] == IPXE_EFI.stat().st_size
    # iPXE asks again and gets the controller's script URL instead of a binary: no loop.
    again = trace.first(r.steps, "proxy offer", "script URL")
    assert again is not None and again.event["payload"]["ipxe"] is True
    for stage in ("GET /boot.ipxe", "GET /ipxe", "GET /ignition"):
        assert by[stage].event["status"] == 200, stage
    assert by["GET /ipxe"].event["profile"] == "lab-node"
    assets = {s.event["endpoint"] for s in r.steps if s.stage == "GET asset"}
    assert assets == {"/assets/lab/vmlinuz", "/assets/lab/initrd.img"}
    # The order a real boot has.
    order = [s.stage for s in r.steps]
    assert order.index("tftp end") < order.index("GET /boot.ipxe") < order.index("GET /ipxe") \
        < order.index("GET /ignition") < order.index("callback")
    # The callback's digest is that of exactly the files in the machine's Ignition config.
    ign = lab.api("GET", "/api/v1/machines/uefi-1/ignition")
    want = trace.expected_files(ign)
    got = r.callback["payload"]["files"]
    assert {p: got[p] for p in want} == want
    assert r.callback["payload"]["digest"] == trace.digest_of(got)
    assert lab.vm_state("uefi-1") == "halted"


def test_bios_node_boots_with_ipxe_straight_away(lab):
    r = lab.boot("bios-1", timeout=400, progress=lambda msg: None)
    assert r.ok, r.problems
    offer = trace.first(r.steps, "proxy offer")
    assert offer.event["payload"]["arch"] == 0 and offer.event["payload"]["ipxe"] is True
    assert not [s for s in r.steps if s.stage.startswith("tftp")]  # iPXE ROM: no TFTP
    assert trace.first(r.steps, "callback") is not None


def test_relay_off_mid_boot_stops_the_vm_and_relay_on_boots_it_again(lab):
    boots = lab.vm_boots("uefi-1")
    after = lab.power_on("uefi-1")
    deadline = time.monotonic() + 300
    while not any(e["kind"] == "tftp" and e["payload"].get("stage") == "end"
                  and e["payload"].get("result") == "ok"
                  for e in lab.events(after, kind="tftp")):
        assert time.monotonic() < deadline, "no TFTP transfer of ipxe.efi"
        time.sleep(0.5)
    vm = lab.vm_pid("uefi-1")
    assert vm is not None
    lab.power("uefi-1", "off")  # mid-boot: iPXE has just been loaded
    deadline = time.monotonic() + 15
    while lab.vm_state("uefi-1") != "off" or pid_running(vm):
        assert time.monotonic() < deadline, "the VM kept running with its relay off"
        time.sleep(0.2)
    assert not [e for e in lab.events(after, kind="callback") if e["machine"] == "uefi-1"]
    r = lab.boot("uefi-1", timeout=400, progress=lambda msg: None)
    assert r.ok, r.problems
    assert lab.vm_boots("uefi-1") == boots + 2  # the cut one, then this one


def test_a_node_whose_heartbeats_stop_is_power_cycled_by_the_device_and_boots_again(lab):
    """The node watchdog end to end: beat-1 beats after its callback (the lab initrd's wget
    loop, standing in for the k3s nodes' bastion-heartbeat.timer), then hangs; the device
    power-cycles it through its relay, and its second boot shows up in the same timeline."""
    run = lab.watchdog_cycle("beat-1", timeout=900, progress=lambda msg: None)
    stages = [s.stage for s in run.steps]
    assert stages[0] == "power on"
    first_cb, second_cb = (i for i, st in enumerate(stages) if st == "callback")
    cycle = stages.index("watchdog cycle")
    assert first_cb < stages.index("heartbeat") < cycle < second_cb
    # the cycle: relay off and on again by the watchdog, between the two boots
    between = run.steps[cycle - 1:second_cb]
    assert {"power off", "power on"} <= {s.stage for s in between}
    offs = [s for s in between if s.stage == "power off"]
    assert offs and offs[0].event["payload"]["why"] == "watchdog"
    assert run.cycle["payload"]["attempt"] == 1
    # each boot beat with its own boot id, and the second boot fetched its config again
    assert run.boot_ids[0] and run.boot_ids[1] and run.boot_ids[0] != run.boot_ids[1]
    beats = [s for s in run.steps if s.stage == "heartbeat"]
    assert [b.event["payload"]["boot_id"] for b in beats][:1] == run.boot_ids[:1]
    assert run.boot_ids[1] in [b.event["payload"]["boot_id"] for b in beats]
    assert stages.count("GET /ipxe") == 2
    assert lab.vm_boots("beat-1") == 2
    assert all(c["payload"]["status"] == "ok" for c in run.callbacks)


def test_lab_traffic_stays_inside_its_namespaces(lab):
    here = os.readlink("/proc/self/ns/net")
    for key, pid in _pids(lab).items():
        assert os.readlink(f"/proc/{pid}/ns/net") != here, f"{key} runs in the host's network"
    host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert PREFIX not in host  # the lab's addresses exist only inside its namespaces
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "br0" not in links and "tap0" not in links


def test_a_stale_lab_is_cleaned_by_the_next_up_and_down_leaves_nothing(lab):
    said = []
    again = Lab(NAME, PREFIX, lab.workdir)
    again.up(progress=said.append)  # over a lab that was never taken down
    assert any(m.startswith("removed a stale lab") for m in said), said
    pids = list(_pids(again).values())
    assert pids and all(pid_running(p) for p in pids)
    removed = again.down()
    assert f"namespace {NAME}-lan" in removed
    assert not {f"{NAME}-lan", f"{NAME}-rt"} & namespaces()
    assert not [p for p in pids if pid_running(p)]
    leftovers = subprocess.run(["pgrep", "-f", str(lab.workdir)], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []
