"""Real TFTP clients against the firmware: tftp-hpa's tftp, atftp, curl and tftpy fetch files
from the sim board (the firmware as .mpy under the MicroPython unix port, 128 KB heap) on
loopback, byte for byte, at awkward sizes; writes, path escapes and missing names get the
proper TFTP ERROR from each of them."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from netkit import (
    atftp_get,
    atftp_put,
    curl_get,
    curl_put,
    fetch,
    tftp_hpa_get,
    tftp_hpa_put,
    tftpy_get,
    tftpy_put,
)

# Sizes around the block boundaries of both block sizes tested (512, 1468), and empty.
SIZES = [0, 1, 511, 512, 513, 1467, 1468, 1469, 2936, 70_001]
ROLLOVER = 512 * 65536 + 100  # more than 65535 blocks of 512: the block number wraps to 0


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    rng = random.Random(1350)
    out = {f"s{n}.bin": rng.randbytes(n) for n in SIZES}
    out["sub/dir/nested.bin"] = rng.randbytes(3000)
    return out


@pytest.fixture
def board(sim_board, files):
    b = sim_board({"script_url": "http://127.0.0.1:8080/boot.ipxe",
                   "tftp": {"timeout_ms": 500, "retries": 6}}, files, heap="128k")
    (b.flash / "secret").write_bytes(b"outside the TFTP root")
    return b


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("client,blksize", [
    ("tftp-hpa", 512), ("atftp", 512), ("atftp", 1468), ("curl", 512), ("curl", 1468),
    ("tftpy", 512), ("tftpy", 1468),
])
def test_real_clients_fetch_every_file_byte_identical(board, files, tmp_path, client, blksize):
    port = board.ports["tftp"]
    for name, data in files.items():
        if client == "curl" and not data:
            # curl 7.88 fails on an empty file (exit 71, getpeername ENOTCONN) against
            # tftp-hpa's in.tftpd too: its bug, not a server's. The others fetch it.
            continue
        out = tmp_path / (name.replace("/", "_") + f".{client}")
        fetch(client, port, name, out, blksize)
        assert _sha(out.read_bytes()) == _sha(data), f"{client} {name}"
    fetched = len(files) - (client == "curl")

    def ends():
        return [e for e in board.events if e.get("ev") == "tftp" and e.get("stage") == "end"]

    # The last transfer's end event may still be on its way (the client can finish first).
    board.wait_event(lambda e: len(ends()) >= fetched, timeout=10)
    assert all(e["result"] == "ok" for e in ends()[-fetched:])
    if client != "tftp-hpa":  # the others ask for the block size
        assert {e["blksize"] for e in board.events
                if e.get("ev") == "tftp" and e.get("stage") == "start"} >= {blksize}


@pytest.mark.timeout(600)
def test_curl_fetches_a_file_past_the_block_number_rollover(sim_board, tmp_path):
    data = os.urandom(ROLLOVER)
    b = sim_board({"script_url": "http://127.0.0.1:8080/boot.ipxe"}, {"big.bin": data},
                  heap="128k")
    out = tmp_path / "big.out"
    r = curl_get(b.ports["tftp"], "big.bin", out, 512)
    assert r.returncode == 0, r.stderr
    assert _sha(out.read_bytes()) == _sha(data)


def test_real_clients_get_the_proper_errors(board, tmp_path):
    port = board.ports["tftp"]
    up = tmp_path / "up.bin"
    up.write_bytes(b"an upload")
    out = tmp_path / "out"

    # tftp-hpa: a write, an escape, a missing file.
    r = tftp_hpa_put(port, up, "up.bin")
    assert "read-only server" in r.stdout + r.stderr
    r = tftp_hpa_get(port, "../secret", out)
    assert "bad file name" in r.stdout + r.stderr
    r = tftp_hpa_get(port, "missing.bin", out)
    assert "file not found" in r.stdout + r.stderr

    # atftp
    r = atftp_put(port, up, "up.bin")
    assert r.returncode != 0 and "read-only server" in r.stdout + r.stderr
    r = atftp_get(port, "../secret", out, 1468)
    assert r.returncode != 0 and "bad file name" in r.stdout + r.stderr
    r = atftp_get(port, "missing.bin", out, 1468)
    assert r.returncode != 0 and "file not found" in r.stdout + r.stderr

    # curl: its exit codes name the TFTP error (68 not found, 69 permission/access problem).
    r = curl_put(port, up, "up.bin")
    assert r.returncode != 0
    r = curl_get(port, "sub/../../secret", out, 1468)
    assert r.returncode != 0
    r = curl_get(port, "missing.bin", out, 1468)
    assert r.returncode == 68, r.stderr  # CURLE_TFTP_NOTFOUND

    # tftpy reports the error code with its own standard text for it, not the server's.
    import tftpy

    with pytest.raises(tftpy.TftpException, match="errorcode = 2"):
        tftpy_put(port, up, "up.bin")
    with pytest.raises(tftpy.TftpException, match="errorcode = 2"):
        tftpy_get(port, "../secret", out, 512)
    with pytest.raises(tftpy.TftpException, match="File not found"):
        tftpy_get(port, "missing.bin", out, 512)

    def codes():
        return [e["code"] for e in board.events
                if e.get("ev") == "tftp" and e.get("stage") == "refused"]

    # Every refusal is an event too; the last may still be on its way from the board.
    board.wait_event(lambda e: codes().count(2) >= 6 and codes().count(1) >= 4, timeout=10)
    assert not (b_read := [e for e in board.events if e.get("file") == "secret"]), b_read


def test_a_symbolic_link_in_the_name_is_refused_on_micropython(board, tmp_path):
    """MicroPython has no realpath, readlink or lstat: the firmware finds links with ilistdir
    and refuses every one, out of the root or not (the controller's TFTP follows links that
    stay inside; docs/device.md). The file itself stays reachable by its own name."""
    root = board.flash / "tftp"
    (root / "escape").symlink_to("../secret")
    (root / "inside").symlink_to("s1.bin")
    (root / "sublink").symlink_to("sub")
    out = tmp_path / "out"
    for name in ("escape", "inside", "sublink/dir/nested.bin"):
        r = tftp_hpa_get(board.ports["tftp"], name, out)
        assert "bad file name" in r.stdout + r.stderr, (name, r.stdout + r.stderr)
    r = tftp_hpa_get(board.ports["tftp"], "sub/dir/nested.bin", out)
    assert r.returncode == 0 and out.stat().st_size == 3000


def test_a_client_reusing_its_port_after_its_last_ack_was_lost_gets_its_next_file(board, files):
    """edk2 and the Pi bootloader fetch file after file from one UDP port: with the last ACK
    of the first file withheld (lost), a request from that port for the next file, or for
    the same one again, is served as a new transfer (on MicroPython, whose addresses are raw
    sockaddrs)."""
    import socket

    server = ("127.0.0.1", board.ports["tftp"])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)  # the old transfer resends its last block meanwhile: skipped below

    def from_a_new_tid(old):
        while True:
            pkt, tid = s.recvfrom(2048)
            if tid != old:
                return pkt, tid

    def take(name, old):
        # DATA 1 of name from a new transfer ID, then every block ACKed but the last
        data = files[name.decode()]
        pkt, tid = from_a_new_tid(old)
        got, k = pkt[4:], 1
        while len(pkt) - 4 == 512:
            s.sendto(bytes((0, 4, 0, k)), tid)
            pkt, _ = from_a_new_tid(old)
            k += 1
            assert pkt[:4] == bytes((0, 3, 0, k))
            got += pkt[4:]
        assert got == data
        return tid, k

    try:
        old = None
        for name in (b"s1469.bin", b"s513.bin", b"s513.bin"):
            s.sendto(b"\0\x01" + name + b"\0octet\0", server)
            old, last = take(name, old)  # its last ACK withheld
        s.sendto(bytes((0, 4, 0, last)), old)
    finally:
        s.close()
    board.wait_event(lambda e: e.get("ev") == "tftp" and e.get("stage") == "end"
                     and e.get("file") == "s513.bin" and e.get("result") == "ok", timeout=10)
