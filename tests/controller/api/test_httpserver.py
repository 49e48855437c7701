"""`bastion serve`'s connection bounds (bastion.api.httpserver), against a real server under a
service's descriptor limit: idle and slow connections cannot lock real clients out."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from bastion.api.httpserver import DescriptorLimitError, connection_cap, redact_tokens
from bastion_testkit import held, parse_prometheus, write_assets

GUARD_S = 30  # a guard against hangs, never a measure


def closed_by_server(s: socket.socket, keep_sending: bytes = b"", every: float = 0.2) -> bool:
    """Whether the server closes `s` within the guard time; `keep_sending` goes out one byte
    each `every` seconds meanwhile (a slow client)."""
    s.settimeout(every)
    deadline = time.monotonic() + GUARD_S
    sent = 0
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionResetError:
            return True
        if sent < len(keep_sending):
            try:
                s.sendall(keep_sending[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            sent += 1
    return False


def closes(server) -> dict[str, float]:
    samples = parse_prometheus(server.get("/metrics").text)[1]
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "bastion_http_connections_closed_total"}  # fmt: skip


def normal_requests(url: str, n: int, give_up_after: int = 5) -> tuple[int, list[str]]:
    """n requests, each on a new connection, as a node's boot steps are: (answered, failures).
    Stops after `give_up_after` failures (a server that lets them all fail would take long)."""
    answered, failures = 0, []
    for _ in range(n):
        try:
            r = httpx.get(url + "/healthz", timeout=3, headers={"Connection": "close"})
            answered += r.status_code == 200
        except httpx.HTTPError as e:
            failures.append(repr(e))
            if len(failures) >= give_up_after:
                break
    return answered, failures


def test_idle_connections_do_not_stop_normal_requests(serve, site_dir):
    """The issue's case at a quarter of the scale: a service's descriptor limit (256 here, 1,024
    under systemd) and more idle connections than that (300 silent, 50 sending half a request
    head): every normal request is still answered, and the site poller still reloads."""
    server = serve(site_dir, nofile=256, poll=0.2)
    generation = server.get("/healthz").json()["generation"]
    with held(server.port, 300), held(server.port, 50, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A"):
        answered, failures = normal_requests(server.url, 100)
        (site_dir / "machines.yaml").write_text(
            (site_dir / "machines.yaml").read_text() + "\n# edited\n"
        )
        deadline = time.monotonic() + GUARD_S
        while (
            server.get("/healthz").json()["generation"] == generation
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        reloaded = server.get("/healthz").json()
    counts = closes(server)
    print(f"\nidle connections held: 350; normal requests answered: {answered} of 100; "
          f"closed by the server: {counts}")  # fmt: skip
    assert answered == 100, failures
    assert reloaded["generation"] > generation and reloaded["status"] == "ok", reloaded
    assert counts.get("evicted", 0) > 0
    log = server.log.read_text()
    assert "Too many open files" not in log and "EMFILE" not in log, log[-2000:]


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(serve, site_dir):
    server = serve(site_dir, args=("--header-timeout", "1"))
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        assert closed_by_server(silent)
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        # one byte every 0.2 s: a head that would take 10 s
        assert closed_by_server(
            slow, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ...\r\n\r\n"
        )
    with socket.create_connection(("127.0.0.1", server.port)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # the answer, then a slow second request on the same connection
        assert closed_by_server(
            kept, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ...\r\n\r\n"
        )
    assert closes(server).get("header-timeout", 0) >= 3
    # a client that sends its request at once is answered as ever
    assert normal_requests(server.url, 5)[0] == 5


def test_a_body_that_does_not_come_is_given_up(serve, site_dir):
    server = serve(site_dir, args=("--body-timeout", "1"))
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nmac=52:54")
        assert closed_by_server(s)
    assert closes(server).get("body-timeout") == 1


def test_over_the_cap_the_longest_idle_goes_and_busy_ones_stay(serve, site_dir):
    server = serve(site_dir, args=("--max-connections", "4"))
    head = b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
    body = b"mac=52:54:00:12:34:01&stage=up"
    with held(server.port, 4, head + body[:10]) as uploads:  # four requests being received
        # no room: a new connection is refused (closed), the uploads go on
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            assert closed_by_server(extra)
        uploads[0].sendall(body[10:])
        answer = uploads[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        # the finished upload's connection is idle now: the next client takes its place
        assert normal_requests(server.url, 3)[0] == 3
        for s in uploads[1:]:
            s.sendall(body[10:])
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    counts = closes(server)
    assert counts.get("refused") == 1 and counts.get("evicted", 0) >= 1, counts


def test_a_host_that_floods_recycles_its_own_connections_not_another_hosts(serve, site_dir):
    # A node (127.0.0.1) has connected and not yet sent its request when another host
    # (127.0.0.2, loopback too) opens connection after connection past the cap. The node's
    # connection has waited longest of all; it stays, and its request is answered.
    server = serve(site_dir, args=("--max-connections", "4"))
    node = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)
    flood = []
    try:
        for _ in range(12):
            flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S,
                                                  source_address=("127.0.0.2", 0)))  # fmt: skip
            time.sleep(0.02)
        node.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = node.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        # the flood's own connections made the room: all but the three beside the node
        counts = closes(server)
        assert counts.get("evicted", 0) + counts.get("refused", 0) == len(flood) - 3, counts
    finally:
        node.close()
        for s in flood:
            s.close()


def test_the_cap_fits_the_descriptor_limit():
    assert connection_cap(1000, 1024) == (1024 - 64) // 2
    assert connection_cap(1000, 524288) == 1000
    assert connection_cap(1000, 1024, tftp_transfers=64) == (1024 - 64 - 131) // 2
    assert connection_cap(10, 256) == 10
    with pytest.raises(DescriptorLimitError, match=r"descriptor limit \(64\).*LimitNOFILE="):
        connection_cap(1000, 64)


def test_serve_says_when_the_descriptor_limit_is_too_low(serve, site_dir):
    with pytest.raises(RuntimeError, match=r"the descriptor limit \(70\) leaves room for 3 HTTP"):
        serve(site_dir, nofile=70)


def one_time_site(root: Path, address: str) -> Path:
    """A site whose one machine's Ignition reads `secrets`: its boot script carries a one-time
    URL (bastion.state.onetime)."""
    site = root / "onetime-site"
    for d in ("profiles", "ignition"):
        (site / d).mkdir(parents=True)
    (site / "site.yaml").write_text("site: s\n")
    (site / "machines.yaml").write_text(
        f"machines:\n  - name: n1\n    mac: 52:54:00:00:00:01\n    profile: secret\n    address: {address}\n"
    )
    (site / "profiles" / "secret.yaml").write_text(
        "kernel: /assets/flatcar/amd64/flatcar_production_pxe.vmlinuz\n"
        "initrd:\n  - /assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz\n"
        "ignition: secret.bu\n"
    )
    (site / "ignition" / "secret.bu").write_text(
        "variant: flatcar\nversion: 1.0.0\nstorage:\n  files:\n    - path: /etc/secrets\n"
        '      contents:\n        inline: "{{ secrets | length }}"\n'
    )
    write_assets(site, ("flatcar/amd64",))
    return site


def test_the_access_log_never_shows_a_token(serve, tmp_path):
    server = serve(one_time_site(tmp_path, "127.0.0.1"), access_log=True)
    script = server.get("/ipxe", params={"mac": "52:54:00:00:00:01"}).text
    url = re.search(r"ignition\.config\.url=\S+?(/ignition\?\S+)", script).group(1)
    token = re.search(r"token=([0-9a-f]{64})", url).group(1)
    assert server.get(url).status_code == 200  # the node's one fetch
    forged = "f" * 64
    assert server.get(f"/ignition?mac=52-54-00-00-00-01&token={forged}").status_code == 403
    server.stop()
    log = server.log.read_text()
    assert '"GET /ignition?token=(redacted)&mac=52-54-00-00-00-01 HTTP/1.1" 200' in log, log
    assert '"GET /ignition?mac=52-54-00-00-00-01&token=(redacted) HTTP/1.1" 403' in log, log
    assert token not in log and forged not in log


def test_an_ipv4_client_of_an_ipv6_listener_is_its_ipv4_address(serve, tmp_path):
    # An IPv6 socket takes IPv4 connections too (`--listen [::]:PORT`; bindv6only is 0), and
    # names their peers ::ffff:a.b.c.d, which no machines.yaml `address:` is. Bound to the
    # IPv4-mapped loopback address, the test's connections are such clients, on loopback only.
    from bastion_testkit import free_tcp_port

    port = free_tcp_port()
    server = serve(one_time_site(tmp_path, "127.0.0.1"), port=port,
                   args=("--listen", f"[::ffff:127.0.0.1]:{port}"))  # fmt: skip
    script = server.get("/ipxe", params={"mac": "52:54:00:00:00:01"})  # the boot front
    assert script.status_code == 200 and "token=" in script.text, script.text
    url = re.search(r"ignition\.config\.url=\S+?(/ignition\?\S+)", script.text).group(1)
    assert server.get(url).status_code == 200  # uvicorn's protocol
    boots = server.get("/api/v1/events", params={"kind": "boot"}).json()
    assert {e["payload"].get("client") for e in boots} == {"127.0.0.1"}


def test_tokens_are_redacted_from_request_lines():
    assert (
        redact_tokens("/ignition?token=0123abc&mac=52-54") == "/ignition?token=(redacted)&mac=52-54"
    )
    assert redact_tokens("/ignition?mac=52-54&TOKEN=x") == "/ignition?mac=52-54&TOKEN=(redacted)"
    assert redact_tokens("/ipxe?mac=52-54&notoken=1") == "/ipxe?mac=52-54&notoken=1"


def _from(address: str, port: int, first: bytes, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(GUARD_S)
    s.bind((address, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(first)
    return s


def test_bodies_one_host_never_finishes_do_not_lock_out_another(serve, site_dir):
    # Only head-waiters used to be closed for a new connection: a host's bodies under way held
    # every place (60 s each, then it sent them again), and every boot - and every operator on
    # the management listener - was refused.
    server = serve(site_dir, args=("--max-connections", "6"))
    head = b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 60000\r\n\r\nmac="
    hog = [_from("127.0.0.2", server.port, head) for _ in range(6)]
    try:
        time.sleep(0.3)
        assert normal_requests(server.url, 5)[0] == 5
        counts = closes(server)
        assert counts.get("evicted", 0) >= 1 and not counts.get("refused"), counts
        # the host's own next connection past the cap finds its bodies ahead of it: it is
        # refused itself, and none of them is given up for it (reading the metrics, from
        # another address, takes a place as a node would)
        hog.append(_from("127.0.0.2", server.port, head))  # the place the eviction freed
        extra = _from("127.0.0.2", server.port, b"")
        assert closed_by_server(extra)
        assert closes(server).get("refused") == 1
    finally:
        for s in hog:
            s.close()


def test_answers_a_host_never_reads_give_way_and_end_at_the_send_timeout(serve, site_dir):
    # bigger than what the kernel buffers for a socket (tcp_wmem's 4 MiB at most): the
    # controller's own buffer fills and its writes pause
    (site_dir / "assets").mkdir(exist_ok=True)
    (site_dir / "assets" / "big.bin").write_bytes(b"\0" * (24 << 20))
    server = serve(site_dir, args=("--max-connections", "6", "--send-timeout", "2"))
    ask = b"GET /assets/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    readers = [_from("127.0.0.2", server.port, ask, rcvbuf=4096) for _ in range(6)]
    try:
        time.sleep(0.5)  # each answer fills the socket buffers and stalls
        assert normal_requests(server.url, 5)[0] == 5
        assert closes(server).get("evicted", 0) >= 1
        # the rest end by themselves once nobody has read for the send timeout
        deadline = time.monotonic() + GUARD_S
        while closes(server).get("send-timeout", 0) + closes(server).get("evicted", 0) < 6:
            assert time.monotonic() < deadline, closes(server)
            time.sleep(0.2)
    finally:
        for s in readers:
            s.close()
