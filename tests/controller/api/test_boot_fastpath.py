"""The boot requests `bastion serve` answers past the application (bastion.api.boot.fast_app,
written by bastion.api.httpserver): on the wire they are what the application answers, in order
with everything else on the connection, in the history and the access log as before; a failing
handler is uvicorn's 500. Checked against a real `bastion serve` and, for the protocol alone,
against the installed uvicorn in this process."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from bastion.api.httpserver import BootFront, ConnectionBounds, bounded_protocol
from fastapi.responses import Response

MAC = "52-54-00-12-34-01"  # examples/site's node1


def exchange(port: int, requests: bytes, timeout: float = 10) -> bytes:
    """Send `requests` (raw, possibly several pipelined) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(requests)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split HTTP/1.1 responses with Content-Length bodies: [(status, headers, body)]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        length = int(headers[b"content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def get(path: str, *extra: str, close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def boot_events(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT kind, mac, machine, endpoint, profile, grp, status, payload FROM events "
                         "WHERE endpoint IN ('/boot.ipxe', '/ipxe') ORDER BY id").fetchall()  # fmt: skip


def test_served_boot_answers_are_the_applications(serve, client_for, site_dir):
    """Byte for byte (but the date) what the application's own stack answers, and the same
    events: a known machine, an unknown MAC (404), the bootstrap."""
    server = serve(site_dir)
    client = client_for(site_dir)
    paths = ["/boot.ipxe", f"/ipxe?mac={MAC}&uuid=&arch=x86_64", "/ipxe?mac=02-00-00-00-00-99", "/boot.ipxe.0"]
    for path in paths:
        (status, headers, body), = responses(exchange(server.port, get(path, close=True)))
        expected = client.get(path, headers={"Host": "127.0.0.1"})  # as the raw request says
        assert (status, body) == (expected.status_code, expected.content), path
        assert headers[b"content-type"] == expected.headers["content-type"].encode()
        assert headers[b"server"] == b"uvicorn" and headers[b"connection"] == b"close"
        assert set(headers) == {b"date", b"server", b"content-length", b"content-type", b"connection",
                                b"cache-control"}  # fmt: skip
        assert headers[b"cache-control"] == expected.headers["cache-control"].encode() == b"no-store"
    served = boot_events(server.db)
    applied = boot_events(Path(client.app.state.runtime.store.path))
    assert len(served) == len(paths) and [e[:7] for e in served] == [e[:7] for e in applied]
    assert served[1][2] == "node1" and served[2][6] == 404


def test_pipelined_requests_are_answered_in_order(serve, site_dir):
    """Fast and full-stack requests pipelined on one connection come back in the order asked."""
    server = serve(site_dir)
    asked = [get("/boot.ipxe"), get(f"/ipxe?mac={MAC}"), get("/healthz"), get(f"/ipxe?mac={MAC}"),
             get("/metadata?mac=" + MAC), get("/boot.ipxe", close=True)]  # fmt: skip
    answered = responses(exchange(server.port, b"".join(asked)))
    assert [status for status, _, _ in answered] == [200] * 6
    bodies = [body for _, _, body in answered]
    assert bodies[0].startswith(b"#!ipxe\nchain ipxe?") and bodies[5] == bodies[0]
    assert bodies[1].startswith(b"#!ipxe\nkernel ") and bodies[3] == bodies[1]
    assert b'"status":"ok"' in bodies[2] and b"\nNAME=node1\n" in bodies[4]


def test_a_forwarded_request_keeps_its_forwarded_client(serve, site_dir):
    """X-Forwarded-For from a proxy named by --trusted-proxies: uvicorn's proxy-headers
    middleware names the client, so such a request takes the application's stack and its event
    says so."""
    server = serve(site_dir, args=("--trusted-proxies", "127.0.0.1, 10.77.0.0/24"))
    exchange(server.port, get(f"/ipxe?mac={MAC}", "X-Forwarded-For: 10.9.8.7", close=True))
    exchange(server.port, get(f"/ipxe?mac={MAC}", close=True))
    (*_, forwarded), (*_, direct) = boot_events(server.db)
    assert '"client":"10.9.8.7"' in forwarded and '"client":"127.0.0.1"' in direct


def test_without_trusted_proxies_x_forwarded_for_names_no_one(serve, site_dir):
    """uvicorn believed 127.0.0.1's X-Forwarded-For by default: any local process (or a LAN
    host behind a proxy that passes the header on) could pass a one-time URL's address check
    as any machine. Without --trusted-proxies the connection's address is the client's."""
    server = serve(site_dir)
    exchange(server.port, get(f"/ipxe?mac={MAC}", "X-Forwarded-For: 10.9.8.7", close=True))
    ((*_, event),) = boot_events(server.db)
    assert '"client":"127.0.0.1"' in event and "10.9.8.7" not in event


def test_trusted_proxies_must_be_addresses(serve, site_dir):
    with pytest.raises(RuntimeError, match=r"--trusted-proxies '\*': not an IP address or network"):
        serve(site_dir, args=("--trusted-proxies", "*"))


def test_the_access_log_has_a_line_per_fast_answer(serve, site_dir):
    server = serve(site_dir, access_log=True)
    exchange(server.port, get(f"/ipxe?mac={MAC}", close=True))
    server.stop()
    assert f'"GET /ipxe?mac={MAC} HTTP/1.1" 200' in server.log.read_text()


# -- the protocol alone, against the installed uvicorn --------------------------------------------


class _Uvicorn:
    """uvicorn with bastion's protocol in a thread of this process: `fast` given, an application
    that answers 'app' to everything else."""

    def __init__(self, fast, max_ahead=None, **config):
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await Response(b"app", 200, media_type="text/plain")(scope, receive, send)

        protocol = bounded_protocol(ConnectionBounds(100, 10, 10), fast=fast)
        assert issubclass(protocol, BootFront)  # every connection starts at the front
        if max_ahead is not None:
            protocol.MAX_AHEAD = max_ahead
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, http=protocol, log_level="critical", lifespan="off", **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.02)
            assert self.thread.is_alive(), "uvicorn did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def test_a_failing_handler_is_a_500_and_the_connection_ends():
    async def boom(scope):
        raise RuntimeError("the history cannot be written")

    async def slow(scope):
        await asyncio.sleep(0.05)  # answered after the request behind it was read
        return Response(b"slow", 200, media_type="text/plain")

    fast = {"/boom": boom, "/slow": slow}
    with _Uvicorn(lambda scope: fast.get(scope["path"]) if scope["method"] == "GET" else None) as u:
        answered = responses(exchange(u.port, get("/slow") + get("/other") + get("/boom") + get("/slow")))
        assert [(s, b) for s, _, b in answered] == [(200, b"slow"), (200, b"app"),
                                                    (500, b"Internal Server Error")]  # fmt: skip
        assert answered[2][1][b"connection"] == b"close"
        # the front's own (the first request on a connection), as uvicorn's above
        ((status, headers, body),) = responses(exchange(u.port, get("/boom") + get("/slow")))
        assert (status, body) == (500, b"Internal Server Error")
        assert {k: v for k, v in headers.items() if k != b"date"} == {
            k: v for k, v in answered[2][1].items() if k != b"date"}  # fmt: skip
        head = [(s, b) for s, _, b in responses(exchange(u.port, b"HEAD /slow HTTP/1.1\r\nHost: x\r\n"
                                                                  b"Connection: close\r\n\r\n"))]  # fmt: skip
        assert head == [(200, b"")]  # not GET: the application's (its HEAD has no body)


def _fast_f(scope):
    async def f(scope):
        return Response(b"fast", 200, media_type="text/plain")

    return f if scope["path"] == "/f" and scope["method"] == "GET" else None


def ask(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[bytes, bytes], bytes, bytes]:
    """One request on a new connection: the first answer (status, headers, body, its head as
    sent), read by its Content-Length; the connection is then closed by the client."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
        length = int(headers[b"content-length"])
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, data
            rest += chunk
        return int(lines[0].split()[1]), headers, rest[:length], head


@pytest.mark.parametrize(
    "request_, answer",
    [
        (get("/f"), (200, b"fast")),  # the front's own
        (b"GET /f?a=%20b&c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", (200, b"fast")),
        (b"GET /%66 HTTP/1.1\r\nHost: x\r\n\r\n", (200, b"fast")),  # uvicorn decodes the path
        (b"GET /f HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", (200, b"fast")),
        (b"GET /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (200, b"fast")),
        (b"GET /f HTTP/1.0\r\nHost: x\r\n\r\n", (200, b"fast")),
        (b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", (200, b"app")),
        (b"GET /f HTTP/1.1\r\nHost x\r\n\r\n", (400, b"Invalid HTTP request received.")),
        (b"GET /f HTTP/1.1\r\nHost: \x01\r\n\r\n", (400, b"Invalid HTTP request received.")),
    ],
    ids=["front", "query", "percent-path", "long-head", "chunked", "http-1.0", "post", "no-colon",
         "control-char"],
)  # fmt: skip
def test_what_the_front_leaves_to_uvicorn_gets_every_byte_and_its_answer(request_, answer):
    with _Uvicorn(_fast_f) as u:
        status, _, body, _ = ask(u.port, request_)
        assert (status, body) == answer


def test_grubs_requests_keep_their_canonical_header_names():
    with _Uvicorn(_fast_f) as u:
        *_, head = ask(u.port, b"GET /f HTTP/1.1\r\nHost: x\r\nUser-Agent: GRUB 2.06\r\n\r\n")
        assert b"\r\nContent-Length: 4" in head  # bastion.api.grubcompat, past the front
        *_, head = ask(u.port, get("/f"))
        assert b"\r\ncontent-length: 4" in head


def test_an_idle_connection_after_an_answer_ends_at_the_keep_alive_timeout():
    # (the head timeout is 10 s: a close within 5 s is the keep-alive timer's)
    with _Uvicorn(_fast_f, timeout_keep_alive=1) as u, socket.create_connection(("127.0.0.1", u.port), timeout=5) as s:
        s.sendall(get("/f"))
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"fast")
        assert s.recv(65536) == b""  # closed by the server after about a second


def test_a_pipelined_flood_is_answered_in_order_with_reads_paused_between():
    n = [0]

    async def numbered(scope):
        n[0] += 1
        await asyncio.sleep(0.002)
        return Response(str(n[0]).encode(), 200, media_type="text/plain")

    # sent in parts while the first answers are in progress: more than max_ahead bytes wait
    with _Uvicorn(lambda scope: numbered if scope["path"] == "/n" else None, max_ahead=200) as u, \
            socket.create_connection(("127.0.0.1", u.port), timeout=10) as s:  # fmt: skip
        for _ in range(8):
            s.sendall(b"".join(get("/n") for _ in range(5)))
            time.sleep(0.005)
        s.sendall(get("/n", close=True))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert [body for _, _, body in responses(data)] == [str(i).encode() for i in range(1, 42)]


def test_shutdown_writes_the_answer_in_progress_then_closes():
    async def slow(scope):
        await asyncio.sleep(0.5)
        return Response(b"slow", 200, media_type="text/plain")

    u = _Uvicorn(lambda scope: slow if scope["path"] == "/slow" else None)
    with u, socket.create_connection(("127.0.0.1", u.port), timeout=10) as s:
        s.sendall(get("/slow"))
        time.sleep(0.1)  # the answer is in progress
        u.server.should_exit = True
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"slow")
