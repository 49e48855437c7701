"""The controller under hostile LAN clients, as a bounded reliability check (marker
`reliability`; CI runs it with everything else): a real `bastion serve` under a service's
descriptor limit, flooded with idle connections and slow request heads from one host and
oversized bodies while a node's boot steps go on from another. It prints its counts."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import httpx
import pytest
from bastion_testkit import parse_prometheus, push_body, request_head, vm_peak_kb

pytestmark = pytest.mark.reliability

NOFILE = 256  # the server's descriptor limit (systemd's default is 1,024)
IDLE = 600  # connections opened and held silent: more than the server has descriptors
SLOW = 100  # connections held with half a request head
NORMAL = 300  # boot-step requests during the flood (and as many after it)
OVERSIZED = 20  # unauthenticated 200 MB PUTs, and as many 200 MB chunked callbacks
MiB = 1024 * 1024

# a node's boot steps (examples/site's node1): method, path, form body
STEPS = [
    ("GET", "/boot.ipxe", None),
    ("GET", "/ipxe?mac=52:54:00:12:34:01", None),
    ("GET", "/ignition?mac=52-54-00-12-34-01", None),
    ("GET", "/metadata?mac=52-54-00-12-34-01", None),
    ("POST", "/callback", {"mac": "52:54:00:12:34:01", "stage": "booted"}),
]


def boot_steps(url: str, n: int, counts: Counter) -> None:
    """n requests, each on its own connection; counts answered (2xx) and failed."""
    with httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        for i in range(n):
            method, path, form = STEPS[i % len(STEPS)]
            try:
                r = c.request(method, path, data=form)
                counts["answered" if r.is_success else f"status {r.status_code}"] += 1
            except httpx.HTTPError as e:
                counts[f"failed: {type(e).__name__}"] += 1


def hold_connections(port: int, socks: list[socket.socket], counts: Counter) -> None:
    # from another host: 127.0.0.2, loopback like the node's 127.0.0.1
    for i in range(IDLE + SLOW):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                         source_address=("127.0.0.2", 0))  # fmt: skip
            if i >= IDLE:
                s.sendall(b"GET /ipxe?mac=52:54:00:12:34:01 HTTP/1.1\r\nHost: x\r\nUser-Ag")
        except OSError:
            counts["not connected"] += 1
            continue
        socks.append(s)
        counts["slow" if i >= IDLE else "idle"] += 1


def test_the_controller_under_idle_slow_and_oversized_clients(serve, site_dir):
    server = serve(site_dir, nofile=NOFILE)
    pid = server.proc.pid
    peak_before = vm_peak_kb(pid)
    attack, during, after, refusals = Counter(), Counter(), Counter(), Counter()
    socks: list[socket.socket] = []
    holder = threading.Thread(target=hold_connections, args=(server.port, socks, attack))
    try:
        holder.start()
        boot_steps(server.url, NORMAL // 2, during)  # while the connections pile up
        holder.join(timeout=120)
        assert not holder.is_alive()
        boot_steps(server.url, NORMAL - NORMAL // 2, during)  # while all of them are held
        for _ in range(OVERSIZED):
            put = request_head("PUT", "/api/v1/machines/evil", server.port,
                               "Content-Type: application/json", f"Content-Length: {200 * MiB}")  # fmt: skip
            status, _ = push_body(server.port, put, 200 * MiB)
            refusals[status] += 1
            chunked = request_head("POST", "/callback", server.port, "Transfer-Encoding: chunked")
            status, _ = push_body(server.port, chunked, 200 * MiB, chunked=True)
            refusals[status] += 1
    finally:
        holder.join(timeout=120)
        for s in socks:
            s.close()
    boot_steps(server.url, NORMAL, after)
    peak_after = vm_peak_kb(pid)
    samples = parse_prometheus(server.get("/metrics").text)[1]
    closed = {dict(labels)["reason"]: int(v) for (name, labels), v in samples.items()
              if name == "bastion_http_connections_closed_total"}  # fmt: skip
    print(
        f"\ncontroller reliability (descriptor limit {NOFILE}): idle connections held "
        f"{attack['idle']} of {IDLE}, slow heads {attack['slow']} of {SLOW} "
        f"({attack['not connected']} not connected); boot requests answered {during['answered']} of {NORMAL} during, "
        f"{after['answered']} of {NORMAL} after; oversized bodies refused "
        f"{dict(sorted(refusals.items()))} of {2 * OVERSIZED}; connections closed by the server "
        f"{closed}; peak memory {peak_before} -> {peak_after} kB"
    )
    assert during == Counter(answered=NORMAL) and after == Counter(answered=NORMAL), (during, after)
    assert refusals == Counter({401: OVERSIZED, 413: OVERSIZED})
    assert attack == Counter(idle=IDLE, slow=SLOW)  # every one connected: none waited on EMFILE
    assert closed.get("evicted", 0) > 0
    assert peak_after - peak_before < 64 * 1024
    log = server.log.read_text()
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
