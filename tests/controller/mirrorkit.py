"""Loopback download sites for `bastion assets fetch`, laid out as the real ones are, with OpenPGP
keys the tests make (a primary key and a signing subkey, as Flatcar's is).

- Flatcar: `<channel>/<arch>-usr/<version>/` with version.txt and detached .sig files, `current/`,
  and the image signing key at /security/image-signing-key/Flatcar_Image_Signing_Key.asc
  (www.flatcar.org's path), all on one CPython http.server on 127.0.0.1.
- k3s: GitHub's release layout, `/k3s-io/k3s/releases/download/<version>/` (the `+` of the
  version URL-encoded, as GitHub's links have it) with `k3s`, `k3s-arm64` and the release's own
  `sha256sum-<arch>.txt`, for a made-up release whose sums file the test writes.

Nothing here reaches the internet; the tests pass these URLs with --mirror and --key-url.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

KERNEL = "flatcar_production_pxe.vmlinuz"
INITRD = "flatcar_production_pxe_image.cpio.gz"
KEY_PATH = "/security/image-signing-key/Flatcar_Image_Signing_Key.asc"
K3S_RELEASES = "/k3s-io/k3s/releases/download"
K3S_BINARY = {"amd64": "k3s", "arm64": "k3s-arm64"}


# -- keys ------------------------------------------------------------------------------------------


@dataclass
class SignerKey:
    home: str
    fingerprint: str  # primary
    subkey: str  # the signing subkey, which makes the signatures (as Flatcar's does)
    armored: Path

    def gpg(self, *args: str, faked_time: str | None = None, input: bytes | None = None):
        # loopback pinentry: the agent asks no terminal for the (empty) passphrase
        argv = ["gpg", "--homedir", self.home, "--batch", "--yes", "--passphrase", "",
                "--pinentry-mode", "loopback"]  # fmt: skip
        if faked_time:
            argv += ["--faked-system-time", faked_time]
        return subprocess.run([*argv, *args], check=True, capture_output=True, input=input)

    def sign(self, data: bytes, *, primary: bool = False, faked_time: str | None = None) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "data"
            src.write_bytes(data)
            argv = ["--detach-sign"]
            if primary:
                argv += ["--local-user", self.fingerprint + "!"]
            self.gpg(*argv, "-o", f"{src}.sig", str(src), faked_time=faked_time)
            return Path(f"{src}.sig").read_bytes()

    def export(self) -> bytes:
        """The public key as it is now (after any change to its subkeys)."""
        return self.gpg("--export", "--armor", self.fingerprint).stdout

    def set_subkey_expiry(self, when: str, faked_time: str | None = None) -> None:
        """A new expiry (YYYY-MM-DD) for the signing subkey, as a publisher extends it."""
        self.gpg("--quick-set-expire", self.fingerprint, when, self.subkey, faked_time=faked_time)

    def add_subkey(self, faked_time: str | None = None) -> str:
        """A new signing subkey (the rotation); returns its fingerprint and signs with it."""
        self.gpg("--quick-add-key", self.fingerprint, "ed25519", "sign", "0", faked_time=faked_time)
        self.subkey = _fingerprints(self.home)[-1]
        self.armored.write_bytes(self.export())
        return self.subkey

    def revoke_subkey(self) -> None:
        """Revoke the signing subkey, as a publisher whose subkey leaked would."""
        # gpg's key editor is the only way to revoke a subkey: select it, revkey, reason 0.
        self.gpg("--command-fd", "0", "--edit-key", self.fingerprint,
                 input=b"key 1\nrevkey\ny\n0\n\ny\nsave\n")  # fmt: skip


def _fingerprints(home: str) -> list[str]:
    listing = subprocess.run(
        ["gpg", "--homedir", home, "--with-colons", "--list-keys"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]


def make_key(name: str, expire: str = "0", faked_time: str | None = None) -> SignerKey:
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
    fprs = _fingerprints(home)
    key = SignerKey(home, fprs[0], fprs[1], Path(home) / "public.asc")
    key.armored.write_bytes(key.export())
    return key


def drop_key(key: SignerKey) -> None:
    # The agent that gen-key and signing started in this home, and only that one.
    subprocess.run(
        ["gpgconf", "--homedir", key.home, "--kill", "gpg-agent"], check=False, capture_output=True
    )
    shutil.rmtree(key.home, ignore_errors=True)


# -- the server --------------------------------------------------------------------------------------


@dataclass
class Mirror:
    """A download site over http.server, with faults on demand. Paths are matched decoded."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # first full GET stops halfway
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    raw_paths: list[str] = field(default_factory=list)  # as requested, before decoding
    url: str = ""

    def serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.raw_paths.append(urlsplit(h.path).path)
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


@contextlib.contextmanager
def serving(tls: dict[str, Path] | None = None) -> Iterator[Mirror]:
    """A mirror on 127.0.0.1; over HTTPS with `tls`, certkit.make_pki's files (ips=127.0.0.1)."""
    m = Mirror()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mirror = m
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls["cert"], tls["key"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    m.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield m
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- Flatcar ------------------------------------------------------------------------------------------


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


def publish_key(mirror: Mirror, key: SignerKey) -> str:
    """The key at www.flatcar.org's path on the mirror; returns its URL (for --key-url)."""
    mirror.files[KEY_PATH] = key.export()
    return mirror.url + KEY_PATH


def publish_flatcar(
    mirror: Mirror,
    key: SignerKey,
    *,
    channel: str = "stable",
    arch: str = "amd64",
    version: str = "4081.2.0",
    layout: str = "2024",
    current: bool = True,
    kernel_size: int = 3_000_000,
    initrd_size: int = 1_500_000,
    faked_time: str | None = None,
) -> Release:
    """A release as Flatcar lays it out: since 2024 the PXE kernel name redirects to
    flatcar_production_image.vmlinuz and only that name has a .sig; before, pxe.vmlinuz.sig."""
    kernel, initrd = os.urandom(kernel_size), os.urandom(initrd_size)

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


def flatcar_args(mirror: Mirror, key: SignerKey) -> list[str]:
    """The options that point `bastion assets fetch flatcar` at the mirror and the test key."""
    return ["--mirror", mirror.url + "/{channel}", "--key-url", mirror.url + KEY_PATH,
            "--key-fingerprint", key.fingerprint]  # fmt: skip


# -- k3s ----------------------------------------------------------------------------------------------


@dataclass
class K3sRelease:
    version: str
    binaries: dict[str, bytes]  # by arch
    base: str  # the release directory's path, decoded: /k3s-io/k3s/releases/download/<v>/

    def sha256(self, arch: str) -> str:
        return hashlib.sha256(self.binaries[arch]).hexdigest()


def publish_k3s(
    mirror: Mirror,
    version: str = "v1.31.4+k3s1",
    arches: tuple[str, ...] = ("amd64", "arm64"),
    size: int = 400_000,
    airgap: bool = False,
) -> K3sRelease:
    """A made-up k3s release in GitHub's layout: random binaries and the sums files that name
    them the way k3s's own do (`<hex>  k3s`), next to other artifacts of the release."""
    base = f"{K3S_RELEASES}/{version}/"
    binaries = {}
    for arch in arches:
        data = os.urandom(size)
        binaries[arch] = data
        name = K3S_BINARY[arch]
        mirror.files[base + name] = data
        lines = [(hashlib.sha256(data).hexdigest(), name)]
        images = f"k3s-airgap-images-{arch}.tar.zst"
        if airgap:
            blob = os.urandom(size // 4)
            mirror.files[base + images] = blob
            lines.append((hashlib.sha256(blob).hexdigest(), images))
        else:
            lines.append((hashlib.sha256(b"not served " + images.encode()).hexdigest(), images))
        lines.append((hashlib.sha256(f"images {arch}".encode()).hexdigest(), "k3s-images.txt"))
        mirror.files[base + f"sha256sum-{arch}.txt"] = "".join(
            f"{h}  {n}\n" for h, n in sorted(lines, key=lambda x: x[1])
        ).encode()
    return K3sRelease(version, binaries, base)


def k3s_url(mirror: Mirror) -> str:
    """The --mirror for `bastion assets fetch k3s`: GitHub's releases/download."""
    return mirror.url + K3S_RELEASES


def encoded(version: str) -> str:
    return quote(version, safe="")


def fetch_k3s_into(
    site: Path,
    version: str = "v1.31.4+k3s1",
    arches: tuple[str, ...] = ("amd64", "arm64"),
    size: int = 200_000,
) -> K3sRelease:
    """A made-up release of `version` fetched into the site by the real `bastion assets fetch
    k3s` code, from a loopback mirror that lives only for the fetch."""
    from bastion.assets.k3s import K3sRequest, fetch_k3s

    with serving() as m:
        release = publish_k3s(m, version, arches, size=size)
        fetch_k3s(K3sRequest(site, version, arches, k3s_url(m)))
    return release


def home_lab_copy(site: Path, version: str = "v1.31.4+k3s1") -> K3sRelease:
    """examples/home-lab copied to `site`, with stand-in Flatcar images and a made-up k3s
    `version` fetched into it as `bastion assets fetch k3s` does; the release (its binaries)."""
    from bastion_testkit import EXAMPLES, write_assets

    shutil.copytree(EXAMPLES / "home-lab", site)
    write_assets(site, ("flatcar/stable/amd64/current", "flatcar/stable/arm64/current"))
    return fetch_k3s_into(site, version)


def render_all(site_dir: Path, store, controller: str = "http://192.168.1.10:8080") -> dict[str, dict]:
    """Every machine's Ignition config as the controller at `controller` renders it, by name."""
    from bastion import boot
    from bastion.model import BootRequest
    from bastion.render.config import render_ignition
    from bastion.site.load import load_site
    from bastion.state.secrets import machine_secrets

    site = load_site(site_dir)
    out = {}
    for m in site.machines:
        group, profile = boot.select(site, {"mac": m.mac})
        req = BootRequest({"mac": m.mac}, f"mac={m.mac}", controller)
        out[m.name] = render_ignition(site, group, profile, req, machine_secrets(store, site, m))
    return out
