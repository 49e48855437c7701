"""The arm64 chainloader and the boot-file architecture checks (bastion.chainload), and what
`bastion flash` does with them: a site with arm64 machines gets the GRUB arm64 image built for
its controller (or its own arm64 iPXE), offered to arch 11 only; a binary for the wrong
architecture is refused before anything is written. Real binaries: Debian's iPXE (x86-64) and
the GRUB image grub-mkimage builds here."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from bastion import chainload, flashing
from bastion.site.load import load_site
from test_flash import MACHINES_YAML, SITE_YAML, make_site

BIN = Path(sys.executable).parent
IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
UNDIONLY = Path("/usr/lib/ipxe/undionly.kpxe")


def _grub_missing() -> str | None:
    if not (chainload.DEFAULT_GRUB_MODULES / "linux.mod").is_file():
        return f"no GRUB arm64 modules in {chainload.DEFAULT_GRUB_MODULES} (tools/build-grub-arm64)"
    if shutil.which("grub-mkimage") is None:
        return "grub-mkimage (grub-common) is missing"
    return None


needs_grub = pytest.mark.skipif(_grub_missing() is not None, reason=_grub_missing() or "")


def fake_pe(machine: int) -> bytes:
    """The smallest bytes pe_machine reads: MZ, e_lfanew, PE signature, machine."""
    data = bytearray(0x80)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x40)
    data[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", data, 0x44, machine)
    return bytes(data)


def test_pe_machine_of_real_binaries():
    if not IPXE_EFI.is_file():
        pytest.skip("Debian's ipxe package is not installed (tools/setup installs it)")
    assert chainload.pe_machine(IPXE_EFI.read_bytes()) == chainload.PE_AMD64
    assert chainload.pe_machine(UNDIONLY.read_bytes()) is None  # BIOS PXE: not a PE image
    assert chainload.pe_machine(b"MZ" + b"\0" * 10) is None  # truncated
    assert chainload.pe_machine(fake_pe(0xAA64)) == chainload.PE_ARM64


@pytest.mark.parametrize("arch, machine, ok", [
    (11, chainload.PE_ARM64, True), (11, chainload.PE_AMD64, False), (11, chainload.PE_I386, False),
    (10, chainload.PE_ARMNT, True), (10, chainload.PE_ARM64, False),
    (7, chainload.PE_AMD64, True), (9, chainload.PE_AMD64, True), (7, chainload.PE_ARM64, False),
    (9, chainload.PE_ARM64, False), (6, chainload.PE_ARM64, False), (6, chainload.PE_I386, True),
    (6, chainload.PE_AMD64, True), (0, chainload.PE_AMD64, False), (0, chainload.PE_ARM64, False),
])  # fmt: skip
def test_which_binary_may_go_to_which_arch(arch, machine, ok):
    why = chainload.check_boot_file(arch, "x.efi", fake_pe(machine))
    assert (why is None) == ok, why


def test_bios_gets_non_pe_and_stand_ins_pass():
    assert chainload.check_boot_file(0, "undionly.kpxe", b"\xeb\x3cundi" * 10) is None
    assert chainload.check_boot_file(7, "snponly.efi", b"s" * 1500) is None  # a test stand-in


@pytest.mark.parametrize("url, prefix", [
    ("http://10.77.0.3:8080", "(http,10.77.0.3:8080)/grub"),
    ("http://10.77.0.3:8080/", "(http,10.77.0.3:8080)/grub"),
    ("http://boot.home.arpa", "(http,boot.home.arpa)/grub"),
    ("http://10.0.0.5:8080/bastion/", "(http,10.0.0.5:8080)/bastion/grub"),
])  # fmt: skip
def test_grub_prefix_from_the_controller_url(url, prefix):
    assert chainload.grub_prefix(url) == prefix


def test_https_is_refused_for_grub():
    with pytest.raises(chainload.ChainloadError, match="no TLS"):
        chainload.grub_prefix("https://boot.example:8443")


@needs_grub
def test_the_grub_image_is_arm64_and_carries_its_prefix(tmp_path):
    out = chainload.build_grub_arm64("http://10.9.8.7:8081/eb", tmp_path / "g.efi")
    data = out.read_bytes()
    assert chainload.pe_machine(data) == chainload.PE_ARM64
    assert b"(http,10.9.8.7:8081)/eb/grub" in data
    assert [p.name for p in tmp_path.iterdir()] == ["g.efi"]  # no temporary files left


def test_missing_modules_say_how_to_get_them(tmp_path):
    with pytest.raises(chainload.ChainloadError, match="tools/build-grub-arm64"):
        chainload.build_grub_arm64("http://x:1", tmp_path / "g.efi", tmp_path / "nowhere")


ARM_MACHINES = MACHINES_YAML + "  - name: pi1\n    mac: dc:a6:32:00:00:01\n    arch: arm64\n"


def _tftp(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "undionly.kpxe").write_bytes(b"u" * 700)
    (root / "snponly.efi").write_bytes(fake_pe(chainload.PE_AMD64))
    for name, data in files.items():
        (root / name.replace("_", ".")).write_bytes(data)
    return root


def flash_dry(site: Path, tftp: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), "flash", "--sim", str(tmp_path / "flash"),
                           "--site", str(site), "--tftp-dir", str(tftp), "--dry-run"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def _device_json(out: str) -> dict:
    text = out.split("device.json:\n", 1)[1]
    return json.loads(text[: text.rindex("}") + 1])


@needs_grub
def test_flash_gives_arm64_machines_the_grub_image_for_arch_11_only(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    r = flash_dry(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    files = _device_json(r.stdout)["boot_files"]
    assert files["11"] == "grubnetaa64.efi"
    assert [a for a, f in files.items() if f == "grubnetaa64.efi"] == ["11"]
    assert "(http,127.0.0.1:8080)/grub" in r.stdout + r.stderr
    # and the image that goes onto the flash is the arm64 one, with the site's controller
    s = load_site(site)
    bdef = flashing.board_definition("sim")
    device = flashing.render_device_config(s, bdef)
    tftp = flashing.tftp_files(tmp_path / "tftp")
    flashing.add_arm64_chainloader(s, device, tftp, tmp_path / "work")
    image = flashing.build_image(bdef, device, tftp)
    grub = image.files["tftp/grubnetaa64.efi"]
    assert chainload.pe_machine(grub) == chainload.PE_ARM64 and b"(http,127.0.0.1:8080)/grub" in grub


def test_the_sites_own_arm64_ipxe_is_preferred(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    r = flash_dry(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_ARM64)), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _device_json(r.stdout)["boot_files"]["11"] == "snp.efi"


def test_a_site_without_arm64_machines_gets_no_arm64_chainloader(tmp_path):
    site = make_site(tmp_path / "site")
    r = flash_dry(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "11" not in _device_json(r.stdout)["boot_files"]


def test_an_x86_binary_for_arch_11_is_refused_before_anything_is_written(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snponly.efi\n    11: snponly.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml, machines_yaml=ARM_MACHINES)
    r = flash_dry(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode != 0
    assert "device.boot_files.11: snponly.efi is an EFI binary for x86-64; arch 11 runs arm64" in r.stderr
    assert not (tmp_path / "flash").exists()


def test_an_arm64_binary_for_x86_is_refused(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snp.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash_dry(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_ARM64)), tmp_path)
    assert r.returncode != 0 and "device.boot_files.7: snp.efi is an EFI binary for arm64" in r.stderr


@needs_grub
def test_naming_the_grub_image_in_boot_files_builds_it(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snponly.efi\n    11: grubnetaa64.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash_dry(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not among the TFTP files" not in r.stderr
    assert "(http,127.0.0.1:8080)/grub" in r.stdout + r.stderr
