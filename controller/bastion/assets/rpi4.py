"""Fetch the Raspberry Pi 4 UEFI firmware (pftf/RPi4) into a site's tftp/, where the Pi asks.

Theory of operation
-------------------
The Pi 4's EEPROM bootloader, network-booting, fetches its firmware over TFTP: ``start4.elf``,
``fixup4.dat``, ``config.txt``, the device trees and, because ``config.txt`` says
``armstub=RPI_EFI.fd``, the UEFI image, which then PXE-boots like any arm64 UEFI machine (arch
11). pftf/RPi4 publishes all of these as one archive per release,
``<mirror>/<tag>/RPi4_UEFI_Firmware_<tag>.zip`` (``<tag>`` as ``v1.41``). The archive is not
signed, so each version's SHA-256 is pinned here (``PINNED``), taken from public build recipes
that check it when they download (the source of each value is next to it). A version that is not
pinned is refused unless the caller gives its checksum (``--sha256``).

What the archive must be, after its checksum: a zip file (zipfile's CRC check on every member)
whose names are relative, '/'-separated, free of ``..``, NUL and backslashes, with no symbolic
links or other special files, no duplicates, no encrypted members, at most ``MAX_MEMBERS``
members and ``MAX_UNPACKED`` bytes unpacked, holding ``RPI_EFI.fd`` and ``start4.elf`` at its
top. Its own ``config.txt`` is kept byte for byte when it already loads the UEFI image; settings
it lacks are appended, and an ``armstub`` naming another file is refused.

Where the Pi asks (EEPROM ``TFTP_PREFIX``, Raspberry Pi bootloader documentation): under its
serial number, ``<8 lower-case hex digits>/`` (``TFTP_PREFIX=0``, the default); under its MAC,
``dc-a6-32-01-02-03/`` (``TFTP_PREFIX=2``); or under ``TFTP_PREFIX_STR`` (``TFTP_PREFIX=1``).
The bootloader clears the prefix when neither start4.elf nor start.elf is found under it, so a
directory we do not make makes the Pi look at tftp/'s top instead, where it finds nothing.

On disk, under the site::

    assets/rpi4-uefi/sha256/<hex>                   the archive, named by its content
    assets/rpi4-uefi/<tag>/RPi4_UEFI_Firmware_<tag>.zip  -> ../sha256/<hex>
    assets/rpi4-uefi/<tag>/manifest.json            what was fetched and laid out where
    tftp/<dir>/...                                  the archive's files, then config.txt
    tftp/<dir>/.bastion-rpi4-uefi.json              marks the directory as this command's
    var/assets-fetch/rpi4-uefi/<tag>/               the download in progress, the unpacked tree

Nothing unchecked reaches tftp/ or assets/: the download and the unpacked tree stay under var/
until every check passes; a refusal deletes them. Each boot directory is built next to its final
place and renamed into it; one made by this command before is replaced the same way, one it did
not make is refused. The files of several boot directories are hard links of one another (read
only), so a site with twenty Pis stores the firmware once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bastion import atomic, match
from bastion.assets.download import (
    CHUNK,
    FetchError,
    Reporter,
    SilentReporter,
    discard_abandoned,
    download_resumable,
    fetching,
    meta_path,
    sha256_of,
    unlink,
)

DEFAULT_MIRROR = "https://github.com/pftf/RPi4/releases/download"
PROJECT_URL = "https://github.com/pftf/RPi4"


@dataclass(frozen=True)
class Pin:
    sha256: str  # of RPi4_UEFI_Firmware_<tag>.zip as pftf/RPi4 published it
    source: str  # where the value was found, and what checks it there


# Only values found in public recipes that verify the download with them. pftf's release notes
# carry no checksum (its CI prints one in the build log only), so there is nothing more official.
PINNED: dict[str, Pin] = {
    "v1.35": Pin(
        "3ea16d6bc4f8f122527ad6a84c0fe84ad80d85fd43a868d99c360ad9e93d3f6e",
        "wuxxin/infra-shared build_defaults.yml (2023-06 to 2024-03), checked by Salt's "
        "file.managed source_hash in build_raspberry_extras.sls",
    ),
    "v1.40": Pin(
        "2fe99b68fff95bd420bd7c8b24a3ef3c76aac2b523046d5742befdc239475844",
        "wuxxin/infra-shared build_defaults.yml and examples/raspberry/build_defaults.yml "
        "(2025-02 on), checked by Salt's file.managed source_hash",
    ),
    "v1.41": Pin(
        "d2a97e36665920dbb5a6aea200e48fc59b1e26cf94a478db7f57833118c2b64a",
        "siemens/mtda meta-isar/recipes-bsp/rpi-edk2-firmware/rpi4-edk2-firmware_1.41.bb "
        "(SRC_URI[sha256sum], checked by BitBake's fetcher)",
    ),
}
DEFAULT_VERSION = "v1.41"

REQUIRED_FILES = ("RPI_EFI.fd", "start4.elf")
MAX_MEMBERS = 1000
MAX_UNPACKED = 256 << 20  # the real archives unpack to a few MB
MARKER = ".bastion-rpi4-uefi.json"

_TAG_RE = re.compile(r"v?([0-9]{1,3})\.([0-9]{1,3})")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_SERIAL_RE = re.compile(r"(?:[0-9a-fA-F]{8})?([0-9a-fA-F]{8})")
_PREFIX_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class ChecksumRefused(FetchError):
    pass


class ArchiveRefused(FetchError):
    pass


def normalise_version(text: str) -> str:
    """`1.41` or `v1.41` -> `v1.41`; FetchError for anything else (it becomes a path)."""
    m = _TAG_RE.fullmatch(text.strip())
    if not m:
        raise FetchError(f"--version {text!r}: not a pftf/RPi4 release such as v1.41")
    return f"v{int(m.group(1))}.{int(m.group(2)):02d}"


def archive_name(tag: str) -> str:
    return f"RPi4_UEFI_Firmware_{tag}.zip"


def _default_dt_address(tag: str) -> tuple[str, str]:
    major, minor = (int(x) for x in tag[1:].split("."))
    return ("0x3e0000", "0x400000") if (major, minor) >= (1, 42) else ("0x1f0000", "0x200000")


# -- where the Pi asks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BootDir:
    """A directory under tftp/ that one Pi (or several) will ask for."""

    path: str  # relative to tftp/, '/'-separated, no trailing slash
    why: str  # for the user: which EEPROM setting makes the Pi ask here


def serial_dir(text: str) -> BootDir:
    """A Pi's serial number: 8 hex digits (the 16-digit /proc/cpuinfo form: its last 8)."""
    m = _SERIAL_RE.fullmatch(text.strip())
    if not m:
        raise FetchError(
            f"serial {text!r}: not a Raspberry Pi serial number (8 hex digits, as on the "
            "bootloader's screen, or the 16 of /proc/cpuinfo)"
        )
    serial = m.group(1).lower()
    return BootDir(serial, f"serial {serial}: EEPROM TFTP_PREFIX=0, the default")


def mac_dir(text: str) -> BootDir:
    try:
        mac = match.parse_mac(text)
    except match.Malformed as e:
        raise FetchError(f"mac {text!r}: {e}") from None
    return BootDir(mac.replace(":", "-"), f"MAC {mac}: EEPROM TFTP_PREFIX=2")


def prefix_dir(text: str) -> BootDir:
    """TFTP_PREFIX_STR: the bootloader puts it in front of every file name, so it must end in
    '/' to be a directory; at most 32 characters (bootloader documentation)."""
    if len(text) > 32 or not text.endswith("/"):
        raise FetchError(
            f"prefix {text!r}: a TFTP_PREFIX_STR for a directory ends with '/' and has at most "
            "32 characters (the bootloader puts it in front of each file name)"
        )
    parts = text[:-1].split("/")
    if not all(_PREFIX_PART_RE.fullmatch(p) and p not in (".", "..") for p in parts):
        raise FetchError(
            f"prefix {text!r}: only letters, digits, '.', '_' and '-' between the '/'s, "
            "no '..', no leading '/'"
        )
    return BootDir("/".join(parts), f"TFTP_PREFIX=1, TFTP_PREFIX_STR={text}")


def dirs_from_site(site_dir: Path, secrets: Path | None = None) -> tuple[list[BootDir], list[str]]:
    """Boot directories for the site's machines labelled `board: rpi4`: `<serial>/` when the
    machine has a `serial` label, and its MAC directory when it has a MAC, so that either
    TFTP_PREFIX (0 or 2) finds its files. Returns them and notes for the user. `secrets`: the
    secret store the site's cluster is checked against (`--secrets`; None: load_site's default)."""
    from bastion.site.load import SiteError, load_site

    try:
        site = load_site(site_dir, secrets=secrets)
    except SiteError as e:
        raise FetchError(
            "the site does not load, so its Raspberry Pis are unknown (give --serial or --mac, "
            "or fix it):\n  " + "\n  ".join(e.problems)
        ) from None
    dirs: list[BootDir] = []
    notes: list[str] = []
    for m in site.machines:
        if m.labels.get("board") != "rpi4":
            continue
        found = []
        if m.labels.get("serial"):
            try:
                d = serial_dir(m.labels["serial"])
            except FetchError as e:
                raise FetchError(f"{m.source}: machine {m.name}: label {e}") from None
            found.append(BootDir(d.path, f"{m.name}, {d.why}"))
        if m.mac:
            d = mac_dir(m.mac)
            found.append(BootDir(d.path, f"{m.name}, {d.why}"))
        if not found:
            notes.append(f"machine {m.name} is labelled board: rpi4 but has no MAC or serial")
        dirs.extend(found)
    return dirs, notes


# -- the request and the result --------------------------------------------------------------------


@dataclass(frozen=True)
class Rpi4Request:
    site: Path
    version: str | None = None  # None: DEFAULT_VERSION
    mirror: str | None = None  # a URL holding <tag>/RPi4_UEFI_Firmware_<tag>.zip
    sha256: str | None = None  # required for a version not in PINNED
    dirs: tuple[BootDir, ...] = ()  # empty: from the site's machines (dirs_from_site)
    secrets: Path | None = None  # the secret store the site loads with (None: the default)


@dataclass
class Rpi4Result:
    version: str
    url: str
    sha256: str
    sha256_source: str  # "pinned" or "--sha256"
    downloaded: bool  # False: the stored archive was used
    archive_path: Path  # assets/rpi4-uefi/<tag>/<archive>
    manifest_path: Path
    manifest: dict
    dirs: list[BootDir]
    files: list[dict]  # name, sha256, size
    config_txt: str  # what happened to config.txt, for the user
    notes: list[str] = field(default_factory=list)


# -- the archive -----------------------------------------------------------------------------------


def _refuse(name: str, problem: str) -> ArchiveRefused:
    return ArchiveRefused(f"{name}: refused: {problem}; nothing was installed")


def check_archive(path: Path, name: str) -> list[zipfile.ZipInfo]:
    """The archive's file members, or ArchiveRefused naming the first problem."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse(name, f"it is not a zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _refuse(name, f"it has {len(infos)} members (at most {MAX_MEMBERS})")
        seen: set[str] = set()
        files = []
        total = 0
        for info in infos:
            n = info.filename
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if "\\" in n or "\0" in n or any(ord(c) < 32 for c in n):
                raise _refuse(name, f"member {n!r} has a backslash or control character")
            if n.startswith("/") or re.match(r"[A-Za-z]:", n):
                raise _refuse(name, f"member {n!r} has an absolute name")
            parts = n.rstrip("/").split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise _refuse(name, f"member {n!r} leaves the archive's directory ('..')")
            if kind == stat.S_IFLNK:
                raise _refuse(name, f"member {n!r} is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse(name, f"member {n!r} is not a regular file or directory")
            if info.flag_bits & 0x1:
                raise _refuse(name, f"member {n!r} is encrypted")
            key = n.rstrip("/")
            if key in seen:
                raise _refuse(name, f"member {n!r} appears twice")
            seen.add(key)
            if info.is_dir():
                continue
            total += info.file_size
            if total > MAX_UNPACKED:
                raise _refuse(name, f"it unpacks to more than {MAX_UNPACKED} bytes")
            files.append(info)
        names = {i.filename for i in files}
        # A file and a directory of the same name, or a file under a file, cannot be unpacked.
        for n in names:
            parts = n.split("/")
            for k in range(1, len(parts)):
                if "/".join(parts[:k]) in names:
                    raise _refuse(name, f"member {n!r} is inside the file {'/'.join(parts[:k])!r}")
        missing = [f for f in REQUIRED_FILES if f not in names]
        if missing:
            raise _refuse(
                name,
                f"it has no {' and no '.join(missing)} at its top: not a Raspberry Pi 4 UEFI "
                "firmware archive",
            )
    return files


def unpack(path: Path, name: str, files: list[zipfile.ZipInfo], tree: Path) -> None:
    """Write the checked members under tree; a CRC mismatch is ArchiveRefused."""
    with zipfile.ZipFile(path) as zf:
        for info in files:
            dst = tree.joinpath(*info.filename.split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(dst, "xb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                raise _refuse(name, f"member {info.filename!r} does not unpack ({e})") from None


def config_txt(archive_text: str | None, tag: str) -> tuple[str, str]:
    """(config.txt to serve, what was done). The archive's settings are kept; those needed to
    load the UEFI image that it lacks are appended after an `[all]` filter."""
    # What loads the UEFI image: pftf/RPi4's own config.txt, whose device tree address moved
    # from 0x1f0000 to 0x3e0000 in v1.42 (pftf/RPi4 "Update device tree address").
    dt_address, dt_end = _default_dt_address(tag)
    needed = {
        "arm_64bit": "1",
        "enable_uart": "1",
        "enable_gic": "1",
        "armstub": "RPI_EFI.fd",
        "disable_commandline_tags": "1",
        "device_tree_address": dt_address,
        "device_tree_end": dt_end,
    }
    if archive_text is None:
        lines = [f"{k}={v}" for k, v in needed.items()]
        return (
            "# bastion assets fetch rpi4-uefi: the archive has no config.txt\n"
            + "\n".join(lines)
            + "\n",
            "written (the archive has none): " + ", ".join(lines),
        )
    have: dict[str, str] = {}
    filtered = False
    for raw in archive_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            filtered = True
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        have.setdefault(key.strip().lower(), value.strip())
    if "armstub" in have and have["armstub"] != "RPI_EFI.fd":
        raise FetchError(
            f"config.txt in the archive sets armstub={have['armstub']}, not RPI_EFI.fd: it "
            "would not load the UEFI image; nothing was installed"
        )
    missing = [k for k in needed if k not in have]
    if not missing:
        return archive_text, "as in the archive (" + ", ".join(
            f"{k}={have[k]}" for k in ("armstub", "device_tree_address", "device_tree_end")
        ) + ")"
    added = [f"{k}={needed[k]}" for k in missing]
    text = archive_text if archive_text.endswith("\n") or not archive_text else archive_text + "\n"
    text += "\n# added by bastion assets fetch rpi4-uefi: settings the archive's config.txt lacks\n"
    if filtered:
        text += "[all]\n"
    text += "\n".join(added) + "\n"
    return text, "the archive's, plus " + ", ".join(added)


# -- fetching --------------------------------------------------------------------------------------


def fetch_rpi4_uefi(
    req: Rpi4Request,
    *,
    client: httpx.Client | None = None,
    reporter: Reporter | None = None,
    now: datetime | None = None,
) -> Rpi4Result:
    """Download (or reuse), check and lay out one pftf/RPi4 release for req.dirs."""
    reporter = reporter or SilentReporter()
    tag = normalise_version(req.version or DEFAULT_VERSION)
    pin = PINNED.get(tag)
    given = req.sha256.strip().lower() if req.sha256 else None
    if given is not None and not _SHA256_RE.fullmatch(given):
        raise FetchError(f"--sha256 {req.sha256!r}: not 64 hex digits")
    if pin is not None and given is not None and given != pin.sha256:
        raise FetchError(
            f"--sha256 {given} differs from the pinned checksum of pftf/RPi4 {tag}, "
            f"{pin.sha256} ({pin.source}); nothing was downloaded"
        )
    if pin is None and given is None:
        raise FetchError(
            f"pftf/RPi4 {tag} has no pinned checksum here (pinned: {', '.join(PINNED)}); "
            f"check the archive yourself and give its SHA-256 with --sha256 HEX, or use a pinned "
            "version; nothing was downloaded"
        )
    expected = given or pin.sha256
    sha_source = "pinned" if pin is not None else "--sha256"
    base = (req.mirror or DEFAULT_MIRROR).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise FetchError(f"--mirror {base!r}: not an http:// or https:// URL")
    name = archive_name(tag)
    url = f"{base}/{tag}/{name}"

    site = Path(req.site)
    notes: list[str] = []
    dirs = list(req.dirs)
    if not dirs:
        dirs, notes = dirs_from_site(site, req.secrets)
        if not dirs:
            raise FetchError(
                "no Raspberry Pi to lay the firmware out for: give --serial, --mac or "
                "--prefix-str, or label the Pis in machines.yaml with `board: rpi4` (and "
                '`serial: "1a2b3c4d"`); docs/raspberry-pi.md'
            )
    dirs = list({d.path: d for d in dirs}.values())  # one per directory, first reason kept
    tftp = site / "tftp"
    for d in dirs:
        _check_target(tftp, d)

    assets = site / "assets" / "rpi4-uefi"
    with fetching(site, client) as (work, client):
        staging = work / "rpi4-uefi" / tag
        for d in dirs:  # again, under the lock
            _check_target(tftp, d)
        discard_abandoned(staging.parent, tag, "pftf/RPi4", reporter)
        stored = assets / "sha256" / expected
        downloaded = sha256_of(stored) != expected
        staging.mkdir(parents=True, exist_ok=True)
        if downloaded:
            reporter.note(f"pftf/RPi4 {tag} from {url}")
            archive = staging / f"{name}.part"
            download_resumable(client, url, archive, name, reporter)
            actual = sha256_of(archive)
            if actual != expected:
                _discard(staging)
                raise ChecksumRefused(
                    f"{name}: refused: its SHA-256 is {actual}, not the {sha_source} "
                    f"{expected} of pftf/RPi4 {tag} (corrupted or tampered with, or not "
                    "that release); the download was deleted and nothing was installed"
                )
        else:
            archive = stored
            reporter.note(
                f"pftf/RPi4 {tag}: the stored archive still matches its checksum; "
                "nothing downloaded"
            )
        tree = staging / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        try:
            members = check_archive(archive, name)
            unpack(archive, name, members, tree)
            cfg_path = tree / "config.txt"
            archive_cfg = (
                cfg_path.read_bytes().decode("utf-8", errors="replace")
                if cfg_path.exists()
                else None
            )
            text, cfg_note = config_txt(archive_cfg, tag)
            if text != archive_cfg:
                unlink(cfg_path)
                cfg_path.write_text(text)
        except FetchError:
            _discard(staging)  # a stored archive stays: it matched its checksum
            raise
        files = _file_list(tree)
        fetched_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        stamp = fetched_at.isoformat().replace("+00:00", "Z")
        marker = {
            "schema": 1,
            "firmware": "rpi4-uefi",
            "version": tag,
            "archive_sha256": expected,
            "fetched_at": stamp,
            "files": files,
        }
        for f in tree.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o444)
        for d in dirs:
            _install(tree, tftp, d, marker)
        archive_path, manifest_path, manifest = _store(
            assets, tag, name, url, archive, downloaded, expected, sha_source, stamp, files,
            cfg_note, dirs,
        )  # fmt: skip
        _discard(staging)
        return Rpi4Result(
            version=tag,
            url=url,
            sha256=expected,
            sha256_source=sha_source,
            downloaded=downloaded,
            archive_path=archive_path,
            manifest_path=manifest_path,
            manifest=manifest,
            dirs=dirs,
            files=files,
            config_txt=cfg_note,
            notes=notes,
        )


def _discard(staging: Path) -> None:
    """Everything staged for a release: the download, its .part.json, the unpacked tree."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.removedirs(staging.parent)  # empty parents only; .lock keeps var/assets-fetch


def _check_target(tftp: Path, d: BootDir) -> None:
    target = tftp.joinpath(*d.path.split("/"))
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise FetchError(f"tftp/{d.path} exists and is not a directory; move it away")
    if target.is_dir() and not (target / MARKER).is_file():
        raise FetchError(
            f"tftp/{d.path}/ exists and was not made by this command (it has no {MARKER}); "
            "move it away or remove it, then run the command again; nothing was installed"
        )


def _file_list(tree: Path) -> list[dict]:
    out = []
    for f in sorted(tree.rglob("*")):
        if f.is_file():
            out.append(
                {
                    "name": f.relative_to(tree).as_posix(),
                    "sha256": sha256_of(f),
                    "size": f.stat().st_size,
                }
            )
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _install(tree: Path, tftp: Path, d: BootDir, marker: dict) -> None:
    """Build tftp/<d> beside its place, then rename it in (replacing one this command made)."""
    target = tftp.joinpath(*d.path.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.bastion-new-{secrets.token_hex(4)}")
    try:
        for src in sorted(tree.rglob("*")):
            rel = src.relative_to(tree)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
        atomic.write_json(tmp / MARKER, {**marker, "dir": d.path})
        if target.is_dir() and atomic.exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # the old tree, under the temporary name
            return
        # no exchange here (an old kernel or filesystem): two renames, with a moment between
        # them in which the directory is missing
        old = None
        if target.is_dir():
            old = target.with_name(f".{target.name}.bastion-old-{secrets.token_hex(4)}")
            os.rename(target, old)
        os.rename(tmp, target)
        atomic.fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _store(
    assets: Path,
    tag: str,
    name: str,
    url: str,
    archive: Path,
    downloaded: bool,
    sha: str,
    sha_source: str,
    stamp: str,
    files: list[dict],
    cfg_note: str,
    dirs: list[BootDir],
) -> tuple[Path, Path, dict]:
    objects = assets / "sha256"
    release = assets / tag
    objects.mkdir(parents=True, exist_ok=True)
    release.mkdir(parents=True, exist_ok=True)
    obj = objects / sha
    if downloaded:
        os.chmod(archive, 0o444)
        atomic.move_into(archive, obj)
        unlink(meta_path(archive))
    link = release / name
    if os.path.lexists(link) and not link.is_symlink():
        raise FetchError(f"{link} exists and is not a link this command made; move it away")
    atomic.symlink(os.path.relpath(obj, release), link)
    manifest = {
        "schema": 1,
        "firmware": "rpi4-uefi",
        "project": PROJECT_URL,
        "version": tag,
        "url": url,
        "archive": {
            "name": name,
            "path": str(link.relative_to(assets.parent)),
            "object": str(obj.relative_to(assets.parent)),
            "sha256": sha,
            "sha256_source": sha_source,
            "size": obj.stat().st_size,
        },
        "fetched_at": stamp,
        "config_txt": cfg_note,
        "boot_dirs": [{"path": f"tftp/{d.path}", "why": d.why} for d in dirs],
        "files": files,
    }
    manifest_path = release / "manifest.json"
    atomic.write_json(manifest_path, manifest)
    return link, manifest_path, manifest
