"""GRUB gets response header names in the case it matches (bastion.api.grubcompat), checked on the
wire against a real `bastion serve` (uvicorn with httptools), with GRUB's own request bytes."""

from __future__ import annotations

import socket

import pytest

from bastion.api.grubcompat import canonical, canonical_head

GRUB_UA = b"GRUB 2.06-13+deb12u2"


def raw_get(port: int, path: str, agent: bytes, extra: bytes = b"") -> bytes:
    """One request as GRUB sends it (no Connection header), read until the body is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + agent + b"\r\n" + extra + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed before the body was complete"
            body += chunk
        return head + b"\r\n\r\n" + body


def header_names(response: bytes) -> list[bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    return [line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:]]


@pytest.fixture
def server(serve, site_dir):
    return serve(site_dir)


def test_grub_gets_content_length_as_it_spells_it(server):
    for path, status in (("/grub/grub.cfg", b" 200 "), ("/grub/arm64-efi/command.lst", b" 404 "),
                         ("/grub?mac=52:54:00:12:34:01", b" 200 ")):
        response = raw_get(server.port, path, GRUB_UA)
        assert status in response.split(b"\r\n", 1)[0]
        names = header_names(response)
        assert b"Content-Length" in names and b"content-length" not in names, (path, names)
        assert b"Content-Type" in names


def test_grub_range_reads_of_assets_carry_the_length_too(server, site_dir):
    response = raw_get(server.port, "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz", GRUB_UA,
                       b"Range: bytes=0-\r\n")
    assert response.split(b"\r\n", 1)[0].split()[1] in (b"200", b"206")
    assert b"Content-Length" in header_names(response)
    body = response.partition(b"\r\n\r\n")[2]
    assert body == (site_dir / "assets/flatcar/amd64/flatcar_production_pxe.vmlinuz").read_bytes()


def test_other_clients_get_uvicorns_bytes_untouched(server):
    for agent in (b"curl/8.0", b"iPXE/1.21.1", b"grub-like-but-not"):
        names = header_names(raw_get(server.port, "/grub/grub.cfg", agent))
        assert b"content-length" in names and b"Content-Length" not in names


def test_only_the_head_is_rewritten():
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx-a-b: c\r\n\r\nfoo-bar: baz"
    assert canonical_head(data) == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A-B: c\r\n\r\nfoo-bar: baz"
    assert canonical(b"transfer-encoding") == b"Transfer-Encoding"
