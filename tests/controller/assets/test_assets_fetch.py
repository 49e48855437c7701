"""`bastion assets fetch flatcar` against a local mirror with a key the test makes.

The mirror is CPython's http.server on 127.0.0.1 laid out as Flatcar's release server is
(<arch>-usr/<version>/, current/, version.txt, detached .sig files), signed by a GPG key made here
(a primary key and a signing subkey, as Flatcar's is). Nothing is fetched from the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bastion.assets import flatcar as af
from bastion.cli import main
from click.testing import CliRunner

KERNEL = "flatcar_production_pxe.vmlinuz"
INITRD = "flatcar_production_pxe_image.cpio.gz"
VERSION = "4081.2.0"


# -- keys ------------------------------------------------------------------------------------------


@dataclass
class SignerKey:
    home: str
    fingerprint: str  # primary
    subkey: str  # the signing subkey, which makes the signatures (as Flatcar's does)
    armored: Path

    def sign(self, data: bytes, *, primary: bool = False, faked_time: str | None = None) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "data"
            src.write_bytes(data)
            argv = ["gpg", "--homedir", self.home, "--batch", "--yes", "--detach-sign"]
            if primary:
                argv += ["--local-user", self.fingerprint + "!"]
            if faked_time:
                argv += ["--faked-system-time", faked_time]
            subprocess.run([*argv, "-o", f"{src}.sig", str(src)], check=True, capture_output=True)
            return Path(f"{src}.sig").read_bytes()


def _make_key(name: str, expire: str = "0", faked_time: str | None = None) -> SignerKey:
    # Short home directory: gpg-agent's socket lives there and socket paths are short.
    home = tempfile.mkdtemp(prefix="bt-gpg-")
    params = (
        "%no-protection\n"
        "Key-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign,cert\n"
        "Subkey-Type: eddsa\nSubkey-Curve: ed25519\nSubkey-Usage: sign\n"
        f"Name-Real: {name}\nName-Email: {name.lower().replace(' ', '-')}@example.invalid\n"
        f"Expire-Date: {expire}\n%commit\n"
    )
    argv = ["gpg", "--homedir", home, "--batch", "--gen-key"]
    if faked_time:
        argv += ["--faked-system-time", faked_time]
    subprocess.run(argv, input=params.encode(), check=True, capture_output=True)
    listing = subprocess.run(
        ["gpg", "--homedir", home, "--with-colons", "--list-keys"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    fprs = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]
    armored = Path(home) / "public.asc"
    armored.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", home, "--export", "--armor"], check=True, capture_output=True
        ).stdout
    )
    return SignerKey(home, fprs[0], fprs[1], armored)


def _drop_key(key: SignerKey) -> None:
    # The agent that gen-key and signing started in this home, and only that one.
    subprocess.run(
        ["gpgconf", "--homedir", key.home, "--kill", "gpg-agent"], check=False, capture_output=True
    )
    shutil.rmtree(key.home, ignore_errors=True)


@pytest.fixture(scope="module")
def test_key():
    key = _make_key("Test Buildbot")
    yield key
    _drop_key(key)


@pytest.fixture(scope="module")
def stranger_key():
    key = _make_key("Someone Else")
    yield key
    _drop_key(key)


# -- the mirror ------------------------------------------------------------------------------------


@dataclass
class Mirror:
    """Flatcar's release-server layout over http.server, with faults on demand."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # first full GET stops halfway
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append((path, {k.lower(): v for k, v in h.headers.items()}))
        if path in self.redirects:
            h.send_response(302)
            h.send_header("Location", self.redirects[path])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.files.get(path)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start, status = 0, 200
        # Only the form a resuming client sends, `bytes=N-`; this is a test peer, not a server.
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if m and h.headers.get("If-Range", etag) == etag:
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        if path in self.cut_once and status == 200:
            self.cut_once.discard(path)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    def gets(self, name: str) -> list[dict[str, str]]:
        return [hdrs for path, hdrs in self.requests if path.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # http.server's names
        self.server.mirror.serve(self, head=False)

    def do_HEAD(self):
        self.server.mirror.serve(self, head=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    m = Mirror()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mirror = m
    m.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield m
    server.shutdown()
    server.server_close()
    thread.join(5)


def version_txt(version: str) -> bytes:
    major, minor, patch = version.split(".")
    return (
        f"FLATCAR_BUILD={major}\nFLATCAR_BRANCH={minor}\nFLATCAR_PATCH={patch}\n"
        f"FLATCAR_VERSION={version}\nFLATCAR_VERSION_ID={version}\n"
        f'FLATCAR_BUILD_ID="2026-11-20-0101"\nFLATCAR_SDK_VERSION={major}.0.0\n'
    ).encode()


@dataclass
class Release:
    kernel: bytes
    initrd: bytes
    base: str  # /stable/amd64-usr/<version>/


def publish(
    mirror: Mirror,
    key: SignerKey,
    *,
    channel: str = "stable",
    arch: str = "amd64",
    version: str = VERSION,
    layout: str = "2024",
    current: bool = True,
    kernel_size: int = 3_000_000,
    faked_time: str | None = None,
) -> Release:
    """A release as Flatcar lays it out: since 2024 the PXE kernel name redirects to
    flatcar_production_image.vmlinuz and only that name has a .sig; before, pxe.vmlinuz.sig."""
    kernel, initrd = os.urandom(kernel_size), os.urandom(1_500_000)

    def sign(data: bytes) -> bytes:
        return key.sign(data, faked_time=faked_time)

    dirs = [f"/{channel}/{arch}-usr/{version}/"] + (
        [f"/{channel}/{arch}-usr/current/"] if current else []
    )
    for d in dirs:
        mirror.files[d + "version.txt"] = version_txt(version)
        mirror.files[d + INITRD] = initrd
        mirror.files[d + INITRD + ".sig"] = sign(initrd)
        if layout == "2024":
            mirror.files[d + "flatcar_production_image.vmlinuz"] = kernel
            mirror.redirects[d + KERNEL] = d + "flatcar_production_image.vmlinuz"
            mirror.files[d + "flatcar_production_image.vmlinuz.sig"] = sign(kernel)
        else:
            mirror.files[d + KERNEL] = kernel
            mirror.files[d + KERNEL + ".sig"] = sign(kernel)
    return Release(kernel, initrd, dirs[0])


def run_fetch(
    site: Path, mirror: Mirror, key: SignerKey | None, *extra: str, key_file: Path | None = None
):
    argv = [
        "assets",
        "fetch",
        "flatcar",
        "--site",
        str(site),
        "--mirror",
        mirror.url + "/{channel}",
    ]
    if key is not None:
        argv += ["--key", str(key_file or key.armored), "--key-fingerprint", key.fingerprint]
    return CliRunner().invoke(main, [*argv, *extra], catch_exceptions=False)


def asset_files(site: Path) -> list[str]:
    assets = site / "assets"
    if not assets.exists():
        return []
    return sorted(str(p.relative_to(assets)) for p in assets.rglob("*") if not p.is_dir())


@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    return d


# -- good signatures ---------------------------------------------------------------------------------


def test_current_release_lands_verified_with_manifest(site, mirror, test_key):
    rel = publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output

    arch_dir = site / "assets/flatcar/stable/amd64"
    assert os.readlink(arch_dir / "current") == VERSION
    for name, data in ((KERNEL, rel.kernel), (INITRD, rel.initrd)):
        served = arch_dir / "current" / name
        assert served.read_bytes() == data
        # Content-addressed: the named file links to the object its SHA-256 names.
        digest = hashlib.sha256(data).hexdigest()
        assert served.resolve() == (site / "assets/flatcar/sha256" / digest).resolve()
        assert (arch_dir / VERSION / f"{name}.sig").is_file()

    manifest = json.loads((arch_dir / VERSION / "manifest.json").read_text())
    assert manifest["version"] == VERSION
    assert manifest["channel"] == "stable" and manifest["arch"] == "amd64"
    assert manifest["trusted_key"] == test_key.fingerprint
    assert datetime.fromisoformat(manifest["fetched_at"]) <= datetime.now(UTC)
    by_name = {f["name"]: f for f in manifest["files"]}
    assert set(by_name) == {KERNEL, INITRD}
    for name, data in ((KERNEL, rel.kernel), (INITRD, rel.initrd)):
        f = by_name[name]
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["size"] == len(data)
        assert f["version"] == VERSION
        assert f["signature_key"] == test_key.subkey  # made by the subkey...
        assert f["signature_primary_key"] == test_key.fingerprint  # ...of the pinned key
        assert f["path"] == f"flatcar/stable/amd64/{VERSION}/{name}"
    assert by_name[KERNEL]["signature_url"].endswith("/flatcar_production_image.vmlinuz.sig")

    # version.txt came from current/, every file from the numbered directory.
    assert [p for p, _ in mirror.requests if "/current/" in p] == [
        "/stable/amd64-usr/current/version.txt"
    ]
    # Nothing half-done anywhere, and the staging area is empty again.
    assert not [p for p in asset_files(site) if p.endswith((".part", ".tmp"))]
    assert not list((site / "var/assets-fetch/flatcar").rglob("*.part"))
    assert "sha256" in result.output and f"current -> {VERSION}" in result.output


def test_releases_before_2024_sign_the_pxe_kernel_under_its_own_name(site, mirror, test_key):
    rel = publish(mirror, test_key, layout="legacy", version="3510.2.8")
    result = run_fetch(site, mirror, test_key, "--version", "3510.2.8")
    assert result.exit_code == 0, result.output
    release = site / "assets/flatcar/stable/amd64/3510.2.8"
    assert (release / KERNEL).read_bytes() == rel.kernel
    manifest = json.loads((release / "manifest.json").read_text())
    kernel = next(f for f in manifest["files"] if f["name"] == KERNEL)
    assert kernel["signature_url"].endswith("/3510.2.8/flatcar_production_pxe.vmlinuz.sig")
    # A pinned version does not move current/ unless asked.
    assert not (site / "assets/flatcar/stable/amd64/current").exists()


def test_a_signature_by_the_primary_key_itself_passes(site, mirror, test_key):
    rel = publish(mirror, test_key)
    d = rel.base
    mirror.files[d + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(
        rel.kernel, primary=True
    )
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    manifest = json.loads(
        (site / f"assets/flatcar/stable/amd64/{VERSION}/manifest.json").read_text()
    )
    kernel = next(f for f in manifest["files"] if f["name"] == KERNEL)
    assert kernel["signature_key"] == test_key.fingerprint


def test_an_old_release_signed_by_a_since_expired_subkey_passes(site, mirror):
    # Flatcar's signing subkeys expire; a release signed while its subkey was valid still verifies.
    old = _make_key("Old Buildbot", expire="1y", faked_time="20200101T000000")
    try:
        rel = publish(
            mirror, old, version="2605.7.0", layout="legacy", faked_time="20200601T000000"
        )
        result = run_fetch(site, mirror, old, "--version", "2605.7.0")
        assert result.exit_code == 0, result.output
        assert "expired since" in result.output
        assert (site / "assets/flatcar/stable/amd64/2605.7.0" / KERNEL).read_bytes() == rel.kernel
    finally:
        _drop_key(old)


# -- refusals: each leaves no asset behind ------------------------------------------------------------


@pytest.mark.parametrize("target", [KERNEL, INITRD])
def test_a_tampered_file_is_refused_and_nothing_of_the_release_is_kept(
    site, mirror, test_key, target
):
    rel = publish(mirror, test_key)
    served = rel.base + ("flatcar_production_image.vmlinuz" if target == KERNEL else INITRD)
    tampered = bytearray(mirror.files[served])
    tampered[len(tampered) // 2] ^= 0x01
    mirror.files[served] = bytes(tampered)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert f"{target}: refused: the signature by key" in result.output
    assert "does not match the file (corrupted or tampered with)" in result.output
    # Not the tampered file, and not the other one either (the kernel verified before the initrd).
    assert asset_files(site) == []
    staged = [p for p in (site / "var/assets-fetch").rglob("*") if p.is_file()]
    assert [p.name for p in staged] == [".lock"]


def test_a_signature_by_another_key_is_refused(site, mirror, test_key, stranger_key):
    publish(mirror, stranger_key)  # a release signed by someone else entirely
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert "which is neither the trusted key" in result.output
    assert stranger_key.subkey[-16:] in result.output
    assert asset_files(site) == []


def test_another_key_inside_the_key_file_is_not_trusted(
    site, mirror, test_key, stranger_key, tmp_path
):
    # The pin is on the primary fingerprint, not on whatever the key file holds.
    both = tmp_path / "both.asc"
    both.write_bytes(test_key.armored.read_bytes() + stranger_key.armored.read_bytes())
    rel = publish(mirror, test_key)
    mirror.files[rel.base + INITRD + ".sig"] = stranger_key.sign(rel.initrd)
    result = run_fetch(site, mirror, test_key, key_file=both)
    assert result.exit_code == 1
    assert f"{INITRD}: refused: it was signed by key {stranger_key.subkey[-16:]}" in result.output
    assert asset_files(site) == []


def test_a_missing_signature_is_refused(site, mirror, test_key):
    rel = publish(mirror, test_key)
    del mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"]
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert f"{KERNEL}: refused: the release publishes no signature for it" in result.output
    assert (
        "flatcar_production_image.vmlinuz.sig, flatcar_production_pxe.vmlinuz.sig" in result.output
    )
    assert asset_files(site) == []
    assert not mirror.gets("flatcar_production_image.vmlinuz")  # not even downloaded


def test_a_key_file_that_is_still_a_placeholder_stops_before_any_download(
    site, mirror, test_key, tmp_path
):
    placeholder = tmp_path / "flatcar-image-signing.asc"
    placeholder.write_text("Replace this file with Flatcar's image signing key.\n")
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, key_file=placeholder)
    assert result.exit_code == 1
    assert "holds no OpenPGP public key" in result.output
    assert af.FLATCAR_KEY_URL in result.output
    assert mirror.requests == []


def test_a_key_file_without_the_pinned_key_is_refused(site, mirror, test_key, stranger_key):
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, key_file=stranger_key.armored)
    assert result.exit_code == 1
    assert f"does not hold the key {test_key.fingerprint}" in result.output


def test_an_unknown_version_is_reported(site, mirror, test_key):
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, "--version", "9999.0.0")
    assert result.exit_code == 1
    assert "no Flatcar release 9999.0.0 at" in result.output
    assert asset_files(site) == []


# -- resuming -------------------------------------------------------------------------------------------


def test_an_interrupted_download_resumes_with_a_range_request(site, mirror, test_key):
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)

    first = run_fetch(site, mirror, test_key)
    assert first.exit_code == 1
    assert f"{KERNEL}: download interrupted after" in first.output
    assert "run the same command again to resume" in first.output
    assert asset_files(site) == []  # nothing under its final name
    part = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}/{KERNEL}.part"
    have = part.stat().st_size
    assert 0 < have < len(rel.kernel)

    second = run_fetch(site, mirror, test_key)
    assert second.exit_code == 0, second.output
    assert f"resuming at byte {have:,}" in second.output
    resumed = mirror.gets("flatcar_production_image.vmlinuz")[-1]
    assert resumed["range"] == f"bytes={have}-"
    assert resumed["if-range"].startswith('"')  # the ETag the first response carried
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == rel.kernel
    assert not part.exists()


def test_a_file_that_changed_on_the_mirror_is_fetched_whole_again(site, mirror, test_key):
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)
    assert run_fetch(site, mirror, test_key).exit_code == 1
    # The mirror now holds a different (properly signed) kernel: If-Range no longer matches.
    new_kernel = os.urandom(2_000_000)
    mirror.files[image] = new_kernel
    mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(new_kernel)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    assert "sent the whole file again" in result.output
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == new_kernel


def test_resume_against_starlette_static_files(site, test_key, tmp_path):
    """The same resume against a real Range implementation (Starlette), with the release laid out
    on disk as Flatcar's server has it: the PXE kernel a symlink to the image kernel."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles
    from starlette.testclient import TestClient

    root = tmp_path / "mirror"
    release = root / "stable/amd64-usr" / VERSION
    release.mkdir(parents=True)
    kernel, initrd = os.urandom(1_000_000), os.urandom(500_000)
    (release / "version.txt").write_bytes(version_txt(VERSION))
    (release / "flatcar_production_image.vmlinuz").write_bytes(kernel)
    (release / KERNEL).symlink_to("flatcar_production_image.vmlinuz")
    (release / "flatcar_production_image.vmlinuz.sig").write_bytes(test_key.sign(kernel))
    (release / INITRD).write_bytes(initrd)
    (release / f"{INITRD}.sig").write_bytes(test_key.sign(initrd))

    staging = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}"
    staging.mkdir(parents=True)
    url = f"http://testserver/stable/amd64-usr/{VERSION}/{KERNEL}"
    (staging / f"{KERNEL}.part").write_bytes(kernel[:400_000])
    (staging / f"{KERNEL}.part.json").write_text(json.dumps({"url": url}))

    seen = []
    app = Starlette(routes=[Mount("/", StaticFiles(directory=root))])
    with TestClient(app) as client:
        client.event_hooks = {"request": [seen.append], "response": []}
        result = af.fetch_flatcar(
            af.FetchRequest(site=site, version=VERSION, mirror="http://testserver/{channel}",
                            key=af.SigningKey(test_key.armored, test_key.fingerprint)),
            client=client,
        )  # fmt: skip
    assert [r.headers.get("range") for r in seen if r.url.path.endswith(KERNEL)] == [
        "bytes=400000-"
    ]
    assert (result.release_dir / KERNEL).read_bytes() == kernel
    assert (result.release_dir / INITRD).read_bytes() == initrd


# -- the controller serves what was fetched ------------------------------------------------------------


def test_bastion_serves_the_fetched_files_by_their_current_path(
    site_dir, client_for, mirror, test_key
):
    rel = publish(mirror, test_key)
    assert run_fetch(site_dir, mirror, test_key).exit_code == 0
    client = client_for(site_dir)
    base = "/assets/flatcar/stable/amd64/current"
    r = client.get(f"{base}/{KERNEL}")
    assert r.status_code == 200 and r.content == rel.kernel
    r = client.get(f"{base}/{INITRD}", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == rel.initrd[100:200]
    assert client.get(f"{base}/manifest.json").json()["version"] == VERSION


# -- the shipped key and small pieces -------------------------------------------------------------------


def test_the_shipped_flatcar_key_holds_the_pinned_primary_key():
    if "BEGIN PGP PUBLIC KEY BLOCK" not in af.FLATCAR_KEY_FILE.read_text():
        pytest.skip("Flatcar's key is not in the tree yet (the file says how to add it); "
                    "the placeholder is refused, see test_a_key_file_that_is_still_a_placeholder")
    with af.Verifier(af.SigningKey.flatcar()) as v, tempfile.TemporaryDirectory() as home:
        listing = subprocess.run(
            ["gpg", "--batch", "--no-options", "--no-autostart", "--homedir", home,
             "--with-colons", "--show-keys", str(v.keyring)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fprs = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]
    assert fprs[0] == af.FLATCAR_PRIMARY_FINGERPRINT
    assert len(fprs) > 1  # its signing subkeys came along


def test_parse_version_txt():
    assert af.parse_version_txt(version_txt("3815.2.2").decode()) == "3815.2.2"
    assert af.parse_version_txt('COREOS_VERSION_ID="1576.1.0"\n') == "1576.1.0"
    assert af.parse_version_txt("nothing here\n") is None


@pytest.mark.parametrize("bad", ["../../etc", "3815.2", "3815.2.2/..", "current"])
def test_versions_that_are_not_versions_are_refused(site, mirror, test_key, bad):
    result = run_fetch(site, mirror, test_key, "--version", bad)
    assert result.exit_code == 1
    assert "not a Flatcar version" in result.output
    assert mirror.requests == []


def test_a_release_already_there_is_checked_not_downloaded_again(site, mirror, test_key):
    rel = publish(mirror, test_key)
    assert run_fetch(site, mirror, test_key).exit_code == 0
    mirror.requests.clear()
    again = run_fetch(site, mirror, test_key)
    assert again.exit_code == 0, again.output
    assert "still verify; nothing downloaded" in again.output
    assert [p for p, _ in mirror.requests] == ["/stable/amd64-usr/current/version.txt"]

    # A stored file that no longer matches is fetched (and verified) again.
    obj = (site / "assets/flatcar/stable/amd64/current" / INITRD).resolve()
    obj.chmod(0o644)
    obj.write_bytes(b"rotten")
    mirror.requests.clear()
    third = run_fetch(site, mirror, test_key)
    assert third.exit_code == 0, third.output
    assert mirror.gets(INITRD)
    assert (site / "assets/flatcar/stable/amd64/current" / INITRD).read_bytes() == rel.initrd


def test_docs_assets_md_matches_the_code():
    doc = (Path(__file__).resolve().parents[3] / "docs" / "assets.md").read_text()
    assert af.FLATCAR_PRIMARY_FINGERPRINT in doc
    assert af.FLATCAR_KEY_URL in doc
    assert str(af.FLATCAR_KEY_FILE.relative_to(Path(__file__).resolve().parents[3])) in doc
    for f in af.FLATCAR_PXE_FILES:
        assert f.name in doc
        for sig in f.signature_names:
            assert sig in doc
    help_text = CliRunner().invoke(main, ["assets", "fetch", "flatcar", "--help"]).output
    for option in re.findall(r"^\| `(--[a-z-]+)", doc, re.MULTILINE):
        assert option in help_text, option
    assert af.DEFAULT_MIRROR in doc
