"""A request through a trusted reverse proxy is the address its X-Forwarded-For names, written
as machines.yaml writes it: a dual-stack proxy gives an IPv4 client as `::ffff:10.77.0.21`
(RFC 4291 2.5.5.2), which is that machine's address all the same. Checked against a real
`bastion serve` (uvicorn's proxy-headers middleware is not in a TestClient's stack)."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

from bastion_testkit import write_assets

NODE = "10.77.0.21"
MAC = "52:54:00:00:00:01"
SECRET_BU = """\
variant: flatcar
version: 1.0.0
storage:
  files:
    - path: /etc/token
      mode: 0600
      contents:
        inline: {{ secrets.token }}
"""


def secret_site(root: Path) -> Path:
    """One machine at NODE whose Ignition reads secrets: its boot script holds a one-time URL,
    served only to NODE (bastion.boot._issue_token)."""
    site = root / "site"
    for d in ("profiles", "ignition"):
        (site / d).mkdir(parents=True)
    (site / "site.yaml").write_text("site: s\nroles:\n  secret: secret\n")
    (site / "machines.yaml").write_text(f"machines:\n  - name: n1\n    mac: {MAC}\n    role: secret\n"
                                        f"    address: {NODE}\n")  # fmt: skip
    (site / "profiles" / "secret.yaml").write_text(
        "kernel: /assets/flatcar/amd64/flatcar_production_pxe.vmlinuz\n"
        "initrd:\n  - /assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz\n"
        "ignition: secret.bu\n"
    )
    (site / "ignition" / "secret.bu").write_text(SECRET_BU)
    write_assets(site, ("flatcar/amd64",))
    return site


def get(port: int, path: str, forwarded_for: str, method: str = "GET") -> tuple[int, bytes]:
    """`method path` (no body) as a proxy on 127.0.0.1 would pass it on; (status, body)."""
    request = (f"{method} {path} HTTP/1.1\r\nHost: 10.77.0.1:8080\r\nX-Forwarded-For: {forwarded_for}\r\n"
               "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_mapped_ipv4_address_from_a_trusted_proxy_is_the_machines_address(serve, tmp_path):
    site = secret_site(tmp_path)
    server = serve(site, args=("--trusted-proxies", "127.0.0.1", "--secrets", str(tmp_path / "secrets")))
    status, body = get(server.port, f"/ipxe?mac={MAC}", f"::ffff:{NODE}")
    # it was 403: "served only to its address 10.77.0.21 ...; this request came from ::ffff:10.77.0.21"
    assert status == 200, body
    assert b"ignition.config.url=http://10.77.0.1:8080/ignition?token=" in body
    assert get(server.port, "/metadata?mac=" + MAC, f"::ffff:{NODE}")[0] == 200
    assert get(server.port, f"/callback?mac={MAC}&stage=up", f"::ffff:{NODE}", "POST")[0] == 200
    with sqlite3.connect(server.db) as c:
        rows = c.execute("SELECT endpoint, payload FROM events WHERE kind IN ('boot', 'callback') "
                         "ORDER BY id").fetchall()  # fmt: skip
    assert [(endpoint, json.loads(payload)["client"]) for endpoint, payload in rows] == [
        ("/ipxe", NODE), ("/metadata", NODE), ("/callback", NODE)]  # fmt: skip
    # an asset fetched through the proxy is the machine's step, named by its address
    assert get(server.port, "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz", f"::ffff:{NODE}")[0] == 200
    with sqlite3.connect(server.db) as c:
        (machine, payload), = c.execute("SELECT machine, payload FROM events WHERE kind = 'asset'").fetchall()
    assert (machine, json.loads(payload)["client"]) == ("n1", NODE)
    # another host, mapped or not, is still another host
    status, body = get(server.port, f"/ipxe?mac={MAC}", "::ffff:10.77.0.66")
    assert status == 403 and b"this request came from 10.77.0.66" in body
