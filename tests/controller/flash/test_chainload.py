"""The arm64 chainloader and the boot-file architecture checks (bastion.flash.chainload), and what
`bastion flash` does with them: a site with arm64 machines gets the GRUB arm64 image built for
its controller (or its own arm64 iPXE), offered to arch 11 only; a binary for the wrong
architecture is refused before anything is written. Real binaries: Debian's iPXE (x86-64) and
the GRUB image grub-mkimage builds here."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bastion.flash import chainload
from bastion.flash import image as flashing
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


def fake_pe(machine: int, magic: int | None = None) -> bytes:
    """The smallest bytes pe_header reads: MZ, e_lfanew, PE signature, machine, and the
    optional header's magic (PE32+ for the 64-bit machines unless told)."""
    if magic is None:
        magic = chainload.PE32_PLUS if machine in (0x8664, 0xAA64) else chainload.PE32
    data = bytearray(0x80)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x40)
    data[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", data, 0x44, machine)
    struct.pack_into("<H", data, 0x58, magic)
    return bytes(data)


def test_pe_machine_of_real_binaries():
    if not IPXE_EFI.is_file():
        pytest.skip("Debian's ipxe package is not installed (tools/setup installs it)")
    assert chainload.pe_header(IPXE_EFI.read_bytes()) == (chainload.PE_AMD64, chainload.PE32_PLUS)
    assert chainload.pe_machine(UNDIONLY.read_bytes()) is None  # BIOS PXE: not a PE image
    assert chainload.pe_machine(b"MZ" + b"\0" * 10) is None  # truncated
    assert chainload.pe_machine(fake_pe(0xAA64)) == chainload.PE_ARM64


def test_real_binaries_against_their_arches():
    if not IPXE_EFI.is_file():
        pytest.skip("Debian's ipxe package is not installed (tools/setup installs it)")
    ipxe, undi = IPXE_EFI.read_bytes(), UNDIONLY.read_bytes()
    assert chainload.check_boot_file(7, "ipxe.efi", ipxe) == (None, None)
    assert chainload.check_boot_file(9, "ipxe.efi", ipxe) == (None, None)
    why, _ = chainload.check_boot_file(11, "ipxe.efi", ipxe)
    assert why == ("ipxe.efi is an EFI binary for x86-64 (machine type 0x8664); arch 11 runs "
                   "arm64 (machine type 0xaa64)")  # fmt: skip
    assert chainload.check_boot_file(0, "undionly.kpxe", undi) == (None, None)
    why, _ = chainload.check_boot_file(0, "ipxe.efi", ipxe)
    assert why and "arch 0 is BIOS PXE" in why
    # arch 6 (IA32 UEFI): Debian's x86-64 ipxe.efi is let through, with a warning
    why, warn = chainload.check_boot_file(6, "ipxe.efi", ipxe)
    assert why is None and "cannot run it" in warn and "no IA32 iPXE" in warn


@needs_grub
def test_the_real_grub_image_goes_to_arch_11_only(tmp_path):
    grub = chainload.build_grub_arm64("http://10.77.0.3:8080", tmp_path / "g.efi").read_bytes()
    assert chainload.is_arm64_efi(grub)
    assert chainload.check_boot_file(11, "grubnetaa64.efi", grub) == (None, None)
    for arch in (0, 6, 7, 9, 10):
        why, _ = chainload.check_boot_file(arch, "grubnetaa64.efi", grub)
        assert why and "arm64 (machine type 0xaa64)" in why, arch


@pytest.mark.parametrize("arch, machine, ok", [
    (11, chainload.PE_ARM64, True), (11, chainload.PE_AMD64, False), (11, chainload.PE_I386, False),
    (11, chainload.PE_ARMNT, False),
    (10, chainload.PE_ARMNT, True), (10, chainload.PE_ARMTHUMB, True), (10, chainload.PE_ARM64, False),
    (7, chainload.PE_AMD64, True), (9, chainload.PE_AMD64, True), (7, chainload.PE_ARM64, False),
    (9, chainload.PE_ARM64, False), (6, chainload.PE_ARM64, False), (6, chainload.PE_I386, True),
    (6, chainload.PE_AMD64, True), (0, chainload.PE_AMD64, False), (0, chainload.PE_ARM64, False),
    (0, chainload.PE_I386, False), (7, chainload.PE_I386, False),
])  # fmt: skip
def test_which_binary_may_go_to_which_arch(arch, machine, ok):
    why, _ = chainload.check_boot_file(arch, "x.efi", fake_pe(machine))
    assert (why is None) == ok, why


def test_a_64_bit_machine_type_needs_a_pe32_plus_image():
    why, _ = chainload.check_boot_file(11, "x.efi", fake_pe(chainload.PE_ARM64, chainload.PE32))
    assert why == ("x.efi is marked arm64 (machine type 0xaa64) but is not a PE32+ image "
                   "(optional header magic 0x10b, not 0x20b)")  # fmt: skip
    assert not chainload.is_arm64_efi(fake_pe(chainload.PE_ARM64, chainload.PE32))


def test_bios_gets_non_pe_and_stand_ins_pass_with_a_warning():
    assert chainload.check_boot_file(0, "undionly.kpxe", b"\xeb\x3cundi" * 10) == (None, None)
    why, warn = chainload.check_boot_file(7, "snponly.efi", b"s" * 1500)  # a test stand-in
    assert why is None and warn == ("snponly.efi is not a PE image; arch 7 clients run EFI "
                                    "binaries for x86-64 (machine type 0x8664) only")  # fmt: skip
    assert chainload.check_boot_file(16, "x", b"s") == (None, None)  # HTTP boot: no rule here


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


@needs_grub
def test_what_a_killed_build_left_is_swept_by_the_next(tmp_path):
    # grub-mkimage killed with its build (a power cut) leaves the temporary image beside the
    # output, a site's tftp/ for tools/build-grub-arm64: the next build takes it away
    left = tmp_path / ".g.efi.bastion-0badf00d.tmp"
    left.write_bytes(b"half an image")
    old = time.time() - 16 * 60
    os.utime(left, (old, old))
    chainload.build_grub_arm64("http://10.9.8.7:8081/eb", tmp_path / "g.efi")
    assert [p.name for p in tmp_path.iterdir()] == ["g.efi"]


def test_missing_modules_say_how_to_get_them(tmp_path):
    with pytest.raises(chainload.ChainloadError, match="tools/build-grub-arm64"):
        chainload.build_grub_arm64("http://x:1", tmp_path / "g.efi", tmp_path / "nowhere")


ARM_MACHINES = MACHINES_YAML + "  - name: pi1\n    mac: dc:a6:32:00:00:01\n    arch: arm64\n"
PREFIX = b"(http,127.0.0.1:8080)/grub"  # SITE_YAML's controller_url


def _tftp(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "undionly.kpxe").write_bytes(b"u" * 700)
    (root / "snponly.efi").write_bytes(fake_pe(chainload.PE_AMD64))
    for name, data in files.items():
        (root / name.replace("_", ".")).write_bytes(data)
    return root


def flash(site: Path, tftp: Path, tmp_path: Path, *extra: str, dry_run: bool = True):
    args = [str(BIN / "bastion"), "flash", "--sim", str(tmp_path / "flash"), "--site", str(site),
            "--tftp-dir", str(tftp), *extra] + (["--dry-run"] if dry_run else [])  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)


def _device_json(out: str) -> dict:
    text = out.split("device.json:\n", 1)[1]
    return json.loads(text[: text.rindex("}") + 1])


@needs_grub
@pytest.mark.parametrize("arch", ["arm64", "aarch64"])
def test_flash_gives_arm64_machines_the_grub_image_for_arch_11_only(tmp_path, arch):
    machines = ARM_MACHINES.replace("arch: arm64", f"arch: {arch}")
    site = make_site(tmp_path / "site", machines_yaml=machines)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    files = _device_json(r.stdout)["boot_files"]
    assert files["11"] == "grubnetaa64.efi"
    assert [a for a, f in files.items() if f == "grubnetaa64.efi"] == ["11"]
    assert ("arch 11 (arm64 UEFI): grubnetaa64.efi, GRUB arm64-efi built with prefix "
            "(http,127.0.0.1:8080)/grub") in r.stdout  # fmt: skip
    assert "tftp/grubnetaa64.efi" in r.stdout  # the plan's file list
    # and the image that goes onto the flash is the arm64 one, with the site's controller
    s = load_site(site)
    bdef = flashing.board_definition("sim")
    device = flashing.render_device_config(s, bdef)
    tftp = flashing.tftp_files(tmp_path / "tftp")
    said = flashing.add_arm64_chainloader(s, device, tftp, tmp_path / "work")
    assert said and "grubnetaa64.efi" in said[0]
    assert flashing.boot_file_checks(device.config, tftp) == ([], [])
    image = flashing.build_image(bdef, device, tftp)
    grub = image.files["tftp/grubnetaa64.efi"]
    assert chainload.is_arm64_efi(grub) and PREFIX in grub
    assert json.loads(image.files["device.json"])["boot_files"]["11"] == "grubnetaa64.efi"


@needs_grub
def test_a_sim_flash_writes_the_grub_image_into_tftp(tmp_path):
    yaml = SITE_YAML.replace("http://127.0.0.1:8080/", "http://10.0.0.5:8081/bastion")
    site = make_site(tmp_path / "site", site_yaml=yaml, machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path, dry_run=False)
    assert r.returncode == 0, r.stdout + r.stderr
    grub = (tmp_path / "flash" / "tftp" / "grubnetaa64.efi").read_bytes()
    assert chainload.is_arm64_efi(grub) and b"(http,10.0.0.5:8081)/bastion/grub" in grub
    device = json.loads((tmp_path / "flash" / "device.json").read_text())
    assert device["boot_files"]["11"] == "grubnetaa64.efi"
    assert device["script_url"] == "http://10.0.0.5:8081/bastion/boot.ipxe"


def test_the_sites_own_arm64_ipxe_is_preferred(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_ARM64)), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _device_json(r.stdout)["boot_files"]["11"] == "snp.efi"
    assert "arch 11 (arm64 UEFI): snp.efi, the site's arm64 iPXE" in r.stdout
    assert "grubnetaa64.efi" not in r.stdout


def test_the_arm64_ipxe_in_the_site_tftp_directory_is_flashed(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    (site / "tftp").mkdir()
    (site / "tftp" / "snp.efi").write_bytes(fake_pe(chainload.PE_ARM64))
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path, dry_run=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "flash" / "tftp" / "snp.efi").read_bytes() == fake_pe(chainload.PE_ARM64)
    device = json.loads((tmp_path / "flash" / "device.json").read_text())
    assert device["boot_files"]["11"] == "snp.efi"


def test_an_https_controller_is_fine_for_an_arm64_ipxe(tmp_path):
    yaml = SITE_YAML.replace("http://127.0.0.1:8080/", "https://boot.home.arpa")
    site = make_site(tmp_path / "site", site_yaml=yaml, machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_ARM64)), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_https_controller_is_refused_for_grub(tmp_path):
    yaml = SITE_YAML.replace("http://127.0.0.1:8080/", "https://boot.home.arpa")
    site = make_site(tmp_path / "site", site_yaml=yaml, machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode != 0
    assert "controller_url 'https://boot.home.arpa' is https" in r.stderr
    assert "GRUB's network stack has no TLS" in r.stderr


@needs_grub
def test_an_x86_snp_efi_is_not_taken_for_arm64(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_AMD64)), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _device_json(r.stdout)["boot_files"]["11"] == "grubnetaa64.efi"
    assert "snp.efi: x86-64 (machine type 0x8664), not an arm64 iPXE: not offered" in r.stdout


def test_missing_grub_modules_name_the_tool(tmp_path):
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    empty = tmp_path / "modules"
    empty.mkdir()
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path, "--grub-modules", str(empty))
    assert r.returncode != 0
    assert f"no GRUB arm64-efi modules in {empty}: run tools/build-grub-arm64" in r.stderr
    assert not (tmp_path / "flash").exists()


@needs_grub
def test_grub_modules_from_another_directory(tmp_path):
    modules = tmp_path / "arm64-efi"
    shutil.copytree(chainload.DEFAULT_GRUB_MODULES, modules)
    site = make_site(tmp_path / "site", machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path, "--grub-modules", str(modules))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _device_json(r.stdout)["boot_files"]["11"] == "grubnetaa64.efi"


def test_a_site_without_arm64_machines_gets_no_arm64_chainloader(tmp_path):
    site = make_site(tmp_path / "site")
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "11" not in _device_json(r.stdout)["boot_files"]
    assert "arch 11" not in r.stdout


def test_an_x86_binary_for_arch_11_is_refused_before_anything_is_written(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snponly.efi\n    11: snponly.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml, machines_yaml=ARM_MACHINES)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path, dry_run=False)
    assert r.returncode != 0
    assert ("site.yaml: device.boot_files.11: snponly.efi is an EFI binary for x86-64 (machine "
            "type 0x8664); arch 11 runs arm64 (machine type 0xaa64)") in r.stderr  # fmt: skip
    assert "refusing to flash" in r.stderr
    assert not (tmp_path / "flash").exists()


def test_debians_ipxe_for_arch_11_is_refused(tmp_path):
    if not IPXE_EFI.is_file():
        pytest.skip("Debian's ipxe package is not installed (tools/setup installs it)")
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snponly.efi\n    11: ipxe.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    tftp = _tftp(tmp_path / "tftp")
    shutil.copy(IPXE_EFI, tftp / "ipxe.efi")
    r = flash(site, tftp, tmp_path)
    assert r.returncode != 0
    assert "device.boot_files.11: ipxe.efi is an EFI binary for x86-64" in r.stderr


def test_an_arm64_binary_for_x86_is_refused(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snp.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash(site, _tftp(tmp_path / "tftp", snp_efi=fake_pe(chainload.PE_ARM64)), tmp_path)
    assert r.returncode != 0
    assert ("device.boot_files.7: snp.efi is an EFI binary for arm64 (machine type 0xaa64); "
            "arch 7 runs x86-64") in r.stderr  # fmt: skip


def test_an_efi_binary_for_bios_is_refused(tmp_path):
    yaml = SITE_YAML.replace("    0: undionly.kpxe\n", "    0: snponly.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode != 0
    assert "device.boot_files.0: snponly.efi is an EFI binary for x86-64" in r.stderr
    assert "arch 0 is BIOS PXE" in r.stderr


def test_x86_64_ipxe_for_ia32_is_a_warning(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    6: snponly.efi\n    7: snponly.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: site.yaml: device.boot_files.6: snponly.efi is an EFI binary for x86-64" in r.stderr


@needs_grub
def test_naming_the_grub_image_in_boot_files_builds_it(tmp_path):
    yaml = SITE_YAML.replace("    7: snponly.efi\n", "    7: snponly.efi\n    11: grubnetaa64.efi\n")
    site = make_site(tmp_path / "site", site_yaml=yaml)
    r = flash(site, _tftp(tmp_path / "tftp"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not among the TFTP files" not in r.stderr
    assert "prefix (http,127.0.0.1:8080)/grub" in r.stdout


def test_tools_build_grub_arm64_uses_the_same_code():
    text = (Path(__file__).resolve().parents[3] / "tools" / "build-grub-arm64").read_text()
    assert "from bastion.flash.chainload import" in text and "grub-mkimage -O" not in text


@needs_grub
def test_the_site_in_docs_raspberry_pi_md_flashes_grub_for_the_pi(tmp_path):
    doc = (Path(__file__).resolve().parents[3] / "docs" / "raspberry-pi.md").read_text()
    site_block = doc.split("```yaml\n# site.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    machines = doc.split("```yaml\n# machines.yaml\n", 1)[1].split("```", 1)[0]
    head = "site: pi\ncontroller_url: http://10.77.0.1:8080\ndefault_profile: plain\n"
    site = make_site(tmp_path / "site", site_yaml=head + site_block, machines_yaml=machines)
    (site / "profiles" / "flatcar-worker.yaml").write_text(
        "os: custom\nkernel: http://10.77.0.1:8080/assets/vmlinuz\n"
    )
    tftp = _tftp(tmp_path / "tftp", ipxe_efi=fake_pe(chainload.PE_AMD64))
    r = flash(site, tftp, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _device_json(r.stdout)["boot_files"] == {
        "7": "ipxe.efi", "9": "ipxe.efi", "11": "grubnetaa64.efi"}  # fmt: skip
    assert "prefix (http,10.77.0.1:8080)/grub" in r.stdout
