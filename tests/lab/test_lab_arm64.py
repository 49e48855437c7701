"""The arm64 lab node (marker `lab`): QEMU's virt machine with AAVMF (edk2's PXE client,
arch 11, like a Raspberry Pi 4 with its UEFI firmware) boots through the device and the
controller to its callback: the device's offer of the GRUB arm64 image, its TFTP transfer,
GRUB's /grub/grub.cfg and /grub, Debian's arm64 kernel and the lab initrd over HTTP, real
Ignition, the callback. Then a mixed lab: the arm64 and the UEFI x86 node boot at the same time.
Skips, saying why, when the arm64 parts (tools/setup, tools/build-grub-arm64) are not here."""

from __future__ import annotations

import json
import os

import pytest
from bastion.lab import trace
from bastion.lab.lab import GRUB_ARM64, Lab, all_nodes, arm64_missing, arm64_node

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

NAME, PREFIX = "eb64", "10.80.0"
KERNEL = "/assets/lab/arm64/vmlinuz"
INITRD = "/assets/lab/arm64/initrd.img"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    why = arm64_missing()
    if why:
        pytest.skip(f"{why}; run tools/setup or tools/build-grub-arm64")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("lab64"))
    try:
        lab.up(all_nodes(), progress=lambda msg: None)  # x86 and arm64 nodes on one LAN
        yield lab
    finally:
        lab.down()


def test_the_device_offers_the_grub_image_to_arm64_clients_only(lab):
    files = json.loads((lab.flash / "device.json").read_text())["boot_files"]
    assert files["11"] == GRUB_ARM64
    assert [a for a, f in files.items() if f == GRUB_ARM64] == ["11"]
    assert files["11"] not in {files.get(a) for a in ("0", "6", "7", "9")}


def test_arm64_node_boots_through_grub_to_its_callback(lab):
    node = arm64_node()
    r = lab.boot(node.name, timeout=400, progress=lambda msg: None)
    assert r.ok, r.problems
    order = [s.stage for s in r.steps]
    assert order[0] == "power on"
    # The device's offers: arch 11, the GRUB image, never an x86 binary, no address handed out.
    offers = [s for s in r.steps if s.stage == "proxy offer"]
    assert offers and all(o.event["payload"]["arch"] == 11 for o in offers)
    assert {o.event["payload"]["file"] for o in offers} == {GRUB_ARM64}
    assert all(o.event["payload"]["ipxe"] is False and o.event["machine"] == node.name for o in offers)
    # The real TFTP read of the GRUB image (after edk2's tsize probe), whole and clean.
    ends = [s for s in r.steps if s.stage == "tftp end"]
    ok = [s for s in ends if s.event["payload"]["result"] == "ok"]
    assert ok and ok[-1].event["payload"]["file"] == GRUB_ARM64
    assert ok[-1].event["payload"]["bytes"] == (lab.flash / "tftp" / GRUB_ARM64).stat().st_size
    # GRUB: its prefix's grub.cfg, then the machine's /grub (by the MAC GRUB booted with).
    by = {s.stage: s for s in r.steps}
    for stage in ("GET /grub/grub.cfg", "GET /grub", "GET /ignition"):
        assert by[stage].event["status"] == 200, stage
    assert by["GET /grub"].event["profile"] == "lab-node-arm64"
    assert by["GET /grub"].event["mac"] == node.mac
    assets = {s.event["endpoint"]: s.event for s in r.steps if s.stage == "GET asset"}
    assert set(assets) == {KERNEL, INITRD}
    for path, ev in assets.items():
        assert ev["status"] == 200
        assert ev["payload"]["size"] == (lab.workdir / "site" / path.lstrip("/")).stat().st_size
    # The order a real boot has.
    assert order.index("tftp end") < order.index("GET /grub/grub.cfg") < order.index("GET /grub") \
        < order.index("GET asset") < order.index("GET /ignition") < order.index("callback")
    # The callback's digest is that of exactly the files in the machine's Ignition config.
    ign = lab.api("GET", f"/api/v1/machines/{node.name}/ignition")
    want = trace.expected_files(ign)
    got = r.callback["payload"]["files"]
    assert want and {p: got[p] for p in want} == want
    assert r.callback["payload"]["digest"] == trace.digest_of(got)
    assert lab.vm_state(node.name) == "halted"


def test_a_mixed_lab_boots_x86_and_arm64_nodes_at_the_same_time(lab):
    results = lab.boot_many(["uefi-1", "arm-1"], timeout=500, progress=lambda msg: None)
    for r in results:
        assert r.ok, (r.node.name, r.problems)
    x86, arm = results
    files = {r.node.name: {s.event["payload"]["file"] for s in r.steps if s.stage == "proxy offer"
                           and not s.event["payload"]["ipxe"]} for r in results}
    assert files == {"uefi-1": {"ipxe.efi"}, "arm-1": {GRUB_ARM64}}
    assert trace.first(x86.steps, "GET /ipxe") and not trace.first(x86.steps, "GET /grub")
    assert trace.first(arm.steps, "GET /grub") and not trace.first(arm.steps, "GET /ipxe")
    # each node fetched its own architecture's kernel
    assert {s.event["endpoint"] for s in arm.steps if s.stage == "GET asset"} == {KERNEL, INITRD}
    assert {s.event["endpoint"] for s in x86.steps if s.stage == "GET asset"} == \
        {"/assets/lab/vmlinuz", "/assets/lab/initrd.img"}
