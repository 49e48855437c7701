"""`bastion assets fetch rpi4-uefi` against a local mirror serving archives the tests make.

The real pftf/RPi4 archives cannot be fetched here (no internet), so every archive is made by the
test: fake firmware files (random bytes) under the real names and layout, and pftf's own
config.txt settings. The mirror is the flatcar tests' http.server on 127.0.0.1 (Range, ETag and a
connection cut on demand). A made archive's checksum is pinned for the test by adding it to
PINNED under a version that does not exist (v9.01), or given with --sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path

import pytest
from bastion.assets import rpi4 as rpi
from bastion.cli import main
from bastion_testkit import REPO
from click.testing import CliRunner
from test_assets_fetch import Mirror, mirror  # noqa: F401  (the loopback mirror fixture)

TAG = "v9.01"  # not a pftf release: pinned by the tests only
SERIAL = "1a2b3c4d"
MAC = "DC:A6:32:01:02:03"
MAC_DIR = "dc-a6-32-01-02-03"
# pftf/RPi4's config.txt as in its releases up to v1.41.
PFTF_CONFIG = (
    b"arm_64bit=1\narm_boost=1\nenable_uart=1\nuart_2ndstage=1\nenable_gic=1\n"
    b"armstub=RPI_EFI.fd\ndisable_commandline_tags=1\ndisable_overscan=1\n"
    b"device_tree_address=0x1f0000\ndevice_tree_end=0x200000\n"
    b"dtoverlay=miniuart-bt\ndtoverlay=upstream-pi4\n"
)


def firmware_files() -> dict[str, bytes]:
    """The members of a pftf/RPi4 release, with random bytes for the binaries."""
    return {
        "RPI_EFI.fd": os.urandom(2_000_000),
        "bcm2711-rpi-4-b.dtb": os.urandom(50_000),
        "bcm2711-rpi-400.dtb": os.urandom(50_000),
        "bcm2711-rpi-cm4.dtb": os.urandom(50_000),
        "config.txt": PFTF_CONFIG,
        "fixup4.dat": os.urandom(5_000),
        "start4.elf": os.urandom(2_200_000),
        "overlays/miniuart-bt.dtbo": os.urandom(1_000),
        "overlays/upstream-pi4.dtbo": os.urandom(3_000),
        "Readme.md": b"Raspberry Pi 4 UEFI Firmware Images (made by a test)\n",
        "firmware/brcm/brcmfmac43455-sdio.bin": os.urandom(20_000),
        "firmware/LICENCE.txt": b"test licence\n",
    }


def make_zip(
    files: dict[str, bytes], *, dirs: bool = True, symlinks: dict[str, str] | None = None
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        if dirs:  # `zip -r` stores directory entries too
            for d in sorted({n.rsplit("/", 1)[0] + "/" for n in files if "/" in n}):
                zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2025, 1, 17, 12, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()




@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    return d


def publish(mirror: Mirror, data: bytes, tag: str = TAG) -> str:
    path = f"/{tag}/RPi4_UEFI_Firmware_{tag}.zip"
    mirror.files[path] = data
    return path


def pin(monkeypatch, data: bytes, tag: str = TAG) -> str:
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(rpi.PINNED, tag, rpi.Pin(sha, "made by the test"))
    return sha


def run(site: Path, mirror: Mirror, *extra: str, version: str = TAG):
    argv = ["assets", "fetch", "rpi4-uefi", "--site", str(site), "--mirror", mirror.url,
            "--version", version]  # fmt: skip
    return CliRunner().invoke(main, [*argv, *extra], catch_exceptions=False)


def left_behind(site: Path) -> list[str]:
    """Every file under the site but the fetch lock (which stays, as for flatcar)."""
    return sorted(
        str(p.relative_to(site)) for p in site.rglob("*") if not p.is_dir() and p.name != ".lock"
    )


def tree(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in d.rglob("*")
        if p.is_file() and p.name != rpi.MARKER
    }


# -- a good archive -----------------------------------------------------------------------------------


def test_a_good_archive_lands_byte_identical_under_serial_and_mac(site, mirror, monkeypatch):
    files = firmware_files()
    data = make_zip(files)
    sha = pin(monkeypatch, data)
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL.upper(), "--mac", MAC)
    assert result.exit_code == 0, result.output

    for d in (SERIAL, MAC_DIR):
        boot = site / "tftp" / d
        assert tree(boot) == files  # every member, config.txt included (it loads the UEFI image)
        marker = json.loads((boot / rpi.MARKER).read_text())
        assert marker["version"] == TAG and marker["archive_sha256"] == sha
        assert marker["dir"] == d
        assert {f["name"]: f["sha256"] for f in marker["files"]} == {
            n: hashlib.sha256(b).hexdigest() for n, b in files.items()
        }
    # The firmware is stored once: the two directories hold hard links of the same files.
    a, b = site / "tftp" / SERIAL / "start4.elf", site / "tftp" / MAC_DIR / "start4.elf"
    assert a.stat().st_ino == b.stat().st_ino
    assert not a.stat().st_mode & 0o222  # read-only: replace, never edit in place

    # The archive is kept by content, with a manifest saying what went where.
    release = site / "assets/rpi4-uefi" / TAG
    stored = release / f"RPi4_UEFI_Firmware_{TAG}.zip"
    assert stored.is_symlink() and stored.read_bytes() == data
    assert stored.resolve() == (site / "assets/rpi4-uefi/sha256" / sha).resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["archive"]["sha256"] == sha and manifest["archive"]["sha256_source"] == "pinned"
    assert manifest["url"] == f"{mirror.url}/{TAG}/RPi4_UEFI_Firmware_{TAG}.zip"
    assert [d["path"] for d in manifest["boot_dirs"]] == [f"tftp/{SERIAL}", f"tftp/{MAC_DIR}"]
    assert manifest["config_txt"].startswith("as in the archive (armstub=RPI_EFI.fd")

    # Nothing staged is left.
    assert not [p for p in (site / "var/assets-fetch").rglob("*") if p.name != ".lock"]
    assert f"tftp/{SERIAL}/  {len(files)} files  (serial {SERIAL}: EEPROM TFTP_PREFIX=0" in (
        result.output
    )
    assert "matches the pinned value" in result.output


def test_boot_directories_come_from_the_sites_pis(site_dir, mirror, monkeypatch):
    # examples/site: pi1 (DC:A6:32:01:02:03, board: rpi4) and two x86 nodes; pi1 gets a serial.
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    publish(mirror, data)
    machines = site_dir / "machines.yaml"
    text = machines.read_text()
    assert "      board: rpi4\n" in text
    machines.write_text(
        text.replace("      board: rpi4\n", '      board: rpi4\n      serial: "1A2B3C4D"\n')
    )
    result = run(site_dir, mirror)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (site_dir / "tftp").iterdir()) == [SERIAL, MAC_DIR]
    assert "pi1, serial 1a2b3c4d: EEPROM TFTP_PREFIX=0" in result.output
    assert "pi1, MAC dc:a6:32:01:02:03: EEPROM TFTP_PREFIX=2" in result.output


def test_a_prefix_string_is_a_directory(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    publish(mirror, data)
    result = run(site, mirror, "--prefix-str", "pis/rack-a/")
    assert result.exit_code == 0, result.output
    assert (site / "tftp/pis/rack-a/RPI_EFI.fd").is_file()


def test_fetching_again_uses_the_stored_archive_and_replaces_its_own_directory(
    site, mirror, monkeypatch
):
    files = firmware_files()
    data = make_zip(files)
    pin(monkeypatch, data)
    path = publish(mirror, data)
    assert run(site, mirror, "--serial", SERIAL).exit_code == 0
    (site / "tftp" / SERIAL / "stale.txt").write_text("left by an older layout")
    mirror.requests.clear()
    again = run(site, mirror, "--serial", SERIAL, "--serial", "0badcafe")
    assert again.exit_code == 0, again.output
    assert "still matches its checksum; nothing downloaded" in again.output
    assert not [p for p, _ in mirror.requests if p == path]
    assert tree(site / "tftp" / SERIAL) == files  # replaced whole: stale.txt is gone
    assert tree(site / "tftp/0badcafe") == files
    assert not [p for p in (site / "tftp").iterdir() if p.name.startswith(".")]


# -- refusals: each leaves nothing behind --------------------------------------------------------------


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    monkeypatch.setitem(rpi.PINNED, TAG, rpi.Pin("ab" * 32, "made by the test"))
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL)
    assert result.exit_code == 1
    assert f"RPi4_UEFI_Firmware_{TAG}.zip: refused: its SHA-256 is " in result.output
    assert f"not the pinned {'ab' * 32}" in result.output
    assert "the download was deleted and nothing was installed" in result.output
    assert left_behind(site) == []
    assert not (site / "tftp").exists()


def test_a_tampered_archive_is_refused_and_nothing_is_kept(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    tampered = bytearray(data)
    tampered[len(tampered) // 3] ^= 0x01
    publish(mirror, bytes(tampered))
    result = run(site, mirror, "--serial", SERIAL)
    assert result.exit_code == 1
    assert "(corrupted or tampered with, or not that release)" in result.output
    assert left_behind(site) == []


def test_an_unpinned_version_needs_its_checksum(site, mirror):
    data = make_zip(firmware_files())
    publish(mirror, data, tag="v9.02")
    refused = run(site, mirror, "--serial", SERIAL, version="9.02")
    assert refused.exit_code == 1
    assert "pftf/RPi4 v9.02 has no pinned checksum here" in refused.output
    assert "--sha256 HEX" in refused.output
    assert mirror.requests == []  # refused before any download

    sha = hashlib.sha256(data).hexdigest()
    ok = run(site, mirror, "--serial", SERIAL, "--sha256", sha.upper(), version="9.02")
    assert ok.exit_code == 0, ok.output
    assert "as --sha256 gave" in ok.output
    manifest = json.loads((site / "assets/rpi4-uefi/v9.02/manifest.json").read_text())
    assert manifest["archive"]["sha256_source"] == "--sha256"


def test_a_sha256_that_contradicts_the_pin_is_refused(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL, "--sha256", "cd" * 32)
    assert result.exit_code == 1
    assert "differs from the pinned checksum" in result.output
    assert mirror.requests == []


@pytest.mark.parametrize(
    "member, problem",
    [
        ("../escape.txt", "leaves the archive's directory"),
        ("overlays/../../escape.txt", "leaves the archive's directory"),
        ("/etc/escape.txt", "has an absolute name"),
        ("C:/escape.txt", "has an absolute name"),
        ("overlays\\..\\..\\escape.txt", "has a backslash"),
    ],
)
def test_names_that_leave_the_archive_are_refused(site, mirror, tmp_path, member, problem):
    files = firmware_files()
    files[member] = b"not where it belongs\n"
    data = make_zip(files, dirs=False)
    publish(mirror, data)
    sha = hashlib.sha256(data).hexdigest()
    result = run(site, mirror, "--serial", SERIAL, "--sha256", sha)
    assert result.exit_code == 1
    assert f"refused: member {member!r} {problem}" in result.output
    assert "nothing was installed" in result.output
    assert left_behind(site) == []
    assert not list(tmp_path.rglob("escape.txt"))


def test_a_symbolic_link_in_the_archive_is_refused(site, mirror, tmp_path):
    data = make_zip(firmware_files(), symlinks={"overlays/evil": "/etc/passwd"})
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL, "--sha256", hashlib.sha256(data).hexdigest())
    assert result.exit_code == 1
    assert "member 'overlays/evil' is a symbolic link" in result.output
    assert left_behind(site) == []


@pytest.mark.parametrize(
    "change, problem",
    [
        ("no-efi", "it has no RPI_EFI.fd at its top"),
        ("no-start", "it has no start4.elf at its top"),
        ("not-zip", "it is not a zip archive"),
        ("bad-crc", "does not unpack"),
        ("duplicate", "appears twice"),
    ],
)
def test_archives_that_are_not_the_firmware_are_refused(site, mirror, change, problem):
    files = firmware_files()
    if change == "no-efi":
        del files["RPI_EFI.fd"]
    if change == "no-start":
        del files["start4.elf"]
    data = make_zip(files)
    if change == "not-zip":
        data = b"<html>a captive portal, not an archive</html>"
    if change == "bad-crc":
        # Flip a byte of start4.elf's stored (compressed) data: the zip still opens.
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = zf.getinfo("start4.elf")
        at = info.header_offset + 30 + len(info.filename) + 1000
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    if change == "duplicate":
        with zipfile.ZipFile(buf := io.BytesIO(data), "a") as zf, pytest.warns(UserWarning):
            zf.writestr("start4.elf", b"a second start4.elf")
        data = buf.getvalue()
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL, "--sha256", hashlib.sha256(data).hexdigest())
    assert result.exit_code == 1
    assert problem in result.output, result.output
    assert left_behind(site) == []


def test_a_directory_this_command_did_not_make_is_not_touched(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    publish(mirror, data)
    mine = site / "tftp" / SERIAL
    mine.mkdir(parents=True)
    (mine / "start4.elf").write_bytes(b"someone's own boot files")
    result = run(site, mirror, "--serial", SERIAL)
    assert result.exit_code == 1
    assert f"tftp/{SERIAL}/ exists and was not made by this command" in result.output
    assert (mine / "start4.elf").read_bytes() == b"someone's own boot files"
    assert mirror.requests == []


def test_no_pi_to_lay_out_for_is_refused(site, mirror, monkeypatch):
    data = make_zip(firmware_files())
    pin(monkeypatch, data)
    publish(mirror, data)
    result = run(site, mirror)
    assert result.exit_code == 1
    assert "no Raspberry Pi to lay the firmware out for" in result.output
    assert mirror.requests == []


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--serial", "1a2b3c4", "not a Raspberry Pi serial number"),
        ("--mac", "dc:a6:32:01:02", "is not a MAC address"),
        ("--prefix-str", "pis", "ends with '/'"),
        ("--prefix-str", "../pis/", "no '..'"),
        ("--prefix-str", "/pis/", "no leading '/'"),
    ],
)
def test_bad_boot_directories_are_refused(site, mirror, option, value, problem):
    result = run(site, mirror, option, value)
    assert result.exit_code == 1
    assert problem in result.output
    assert mirror.requests == []


# -- resuming -------------------------------------------------------------------------------------------


def test_an_interrupted_download_resumes(site, mirror, monkeypatch):
    files = firmware_files()
    data = make_zip(files)
    pin(monkeypatch, data)
    path = publish(mirror, data)
    mirror.cut_once.add(path)

    first = run(site, mirror, "--serial", SERIAL)
    assert first.exit_code == 1
    assert f"RPi4_UEFI_Firmware_{TAG}.zip: download interrupted after" in first.output
    assert "run the same command again to resume" in first.output
    part = site / f"var/assets-fetch/rpi4-uefi/{TAG}/RPi4_UEFI_Firmware_{TAG}.zip.part"
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert not (site / "tftp").exists() and not (site / "assets").exists()

    second = run(site, mirror, "--serial", SERIAL)
    assert second.exit_code == 0, second.output
    assert f"resuming at byte {have:,}" in second.output
    resumed = mirror.gets(f"RPi4_UEFI_Firmware_{TAG}.zip")[-1]
    assert resumed["range"] == f"bytes={have}-" and resumed["if-range"].startswith('"')
    assert tree(site / "tftp" / SERIAL) == files
    assert not part.exists()


def test_the_unfinished_download_of_another_version_is_discarded(site, mirror, monkeypatch):
    # It stayed in var/assets-fetch/rpi4-uefi/<tag>/ for ever once another version was fetched.
    old = make_zip(firmware_files())
    pin(monkeypatch, old)
    mirror.cut_once.add(publish(mirror, old))
    assert run(site, mirror, "--serial", SERIAL).exit_code == 1
    abandoned = site / f"var/assets-fetch/rpi4-uefi/{TAG}"
    assert (abandoned / f"RPi4_UEFI_Firmware_{TAG}.zip.part").is_file()
    files = firmware_files()
    new = make_zip(files)
    pin(monkeypatch, new, tag="v9.02")
    publish(mirror, new, tag="v9.02")
    result = run(site, mirror, "--serial", SERIAL, version="v9.02")
    assert result.exit_code == 0, result.output
    assert not abandoned.exists()
    assert (f"discarded {abandoned}, what an unfinished fetch of pftf/RPi4 {TAG} left: this "
            "fetch is of v9.02") in result.output  # fmt: skip
    assert tree(site / "tftp" / SERIAL) == files


# -- config.txt -----------------------------------------------------------------------------------------


def test_config_txt_missing_settings_are_added_after_the_archives(site, mirror):
    files = firmware_files()
    files["config.txt"] = b"[pi4]\narm_64bit=1\narmstub=RPI_EFI.fd\ndtoverlay=miniuart-bt\n"
    data = make_zip(files)
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL, "--sha256", hashlib.sha256(data).hexdigest())
    assert result.exit_code == 0, result.output
    text = (site / "tftp" / SERIAL / "config.txt").read_text()
    assert text.startswith(files["config.txt"].decode())  # the archive's lines, unchanged
    added = text[len(files["config.txt"]) :].splitlines()
    assert "[all]" in added  # out of the archive's [pi4] filter
    for setting in ("enable_uart=1", "enable_gic=1", "disable_commandline_tags=1",
                    "device_tree_address=0x3e0000", "device_tree_end=0x400000"):  # fmt: skip
        assert setting in added  # v9.01 is after v1.42, where pftf moved the device tree
    for name, body in files.items():
        if name != "config.txt":
            assert (site / "tftp" / SERIAL / name).read_bytes() == body


def test_config_txt_that_loads_another_armstub_is_refused(site, mirror):
    files = firmware_files()
    files["config.txt"] = PFTF_CONFIG.replace(b"armstub=RPI_EFI.fd", b"armstub=other.bin")
    data = make_zip(files)
    publish(mirror, data)
    result = run(site, mirror, "--serial", SERIAL, "--sha256", hashlib.sha256(data).hexdigest())
    assert result.exit_code == 1
    assert "sets armstub=other.bin, not RPI_EFI.fd" in result.output
    assert left_behind(site) == []


def test_config_txt_is_written_when_the_archive_has_none():
    text, note = rpi.config_txt(None, "v1.41")
    assert "armstub=RPI_EFI.fd\n" in text and "device_tree_address=0x1f0000\n" in text
    assert note.startswith("written (the archive has none)")


# -- the table, names and docs ------------------------------------------------------------------------


def test_the_pinned_table_is_well_formed():
    assert rpi.DEFAULT_VERSION in rpi.PINNED
    for tag, p in rpi.PINNED.items():
        assert rpi.normalise_version(tag) == tag
        assert re.fullmatch(r"[0-9a-f]{64}", p.sha256), tag
        assert p.source


def test_names():
    assert rpi.normalise_version("1.41") == rpi.normalise_version("v1.41") == "v1.41"
    assert rpi.serial_dir("100000001A2B3C4D").path == SERIAL  # /proc/cpuinfo's form
    assert rpi.mac_dir("dc-a6-32-01-02-03").path == MAC_DIR
    assert rpi.prefix_dir("tftp_test/").path == "tftp_test"
    for bad in ("1.4.1", "../1.41", "latest"):
        with pytest.raises(rpi.FetchError):
            rpi.normalise_version(bad)


def test_docs_raspberry_pi_md_matches_the_code():
    doc = (REPO / "docs" / "raspberry-pi.md").read_text()
    for tag, p in rpi.PINNED.items():
        assert f"`{tag}`" in doc and p.sha256 in doc, tag
    assert rpi.DEFAULT_MIRROR in doc and rpi.MARKER in doc
    help_text = CliRunner().invoke(main, ["assets", "fetch", "rpi4-uefi", "--help"]).output
    for option in re.findall(r"^\| `(--[a-z0-9-]+)", doc, re.MULTILINE):
        assert option in help_text, option
    for linked in ("README.md", "docs/assets.md"):
        assert "raspberry-pi.md" in (REPO / linked).read_text(), linked


def test_the_bastion_commands_in_docs_raspberry_pi_md_exist():
    """Each `$ bastion ...` line of the doc runs with --help appended (its command and options
    are the CLI's), as docs/site-files.md's runnable blocks do."""
    import shlex

    doc = (REPO / "docs" / "raspberry-pi.md").read_text()
    lines = [ln[2:] for ln in doc.splitlines() if ln.startswith("$ bastion ")]
    assert lines
    for line in lines:
        argv = shlex.split(line)[1:]
        result = CliRunner().invoke(main, [*argv, "--help"])
        assert result.exit_code == 0, (line, result.output)
        for word in argv:
            if word.startswith("--"):
                assert word in result.output, (line, word)


def test_the_machines_yaml_in_docs_raspberry_pi_md_gives_both_directories(site_dir):
    doc = (REPO / "docs" / "raspberry-pi.md").read_text()
    block = doc.split("```yaml\n# machines.yaml\n", 1)[1].split("```", 1)[0]
    (site_dir / "machines.yaml").write_text(block)
    dirs, notes = rpi.dirs_from_site(site_dir)
    assert [d.path for d in dirs] == [SERIAL, MAC_DIR] and notes == []
