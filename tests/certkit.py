"""A small PKI made with openssl for a test: a CA, a server certificate for the names and
addresses given, and a client certificate (for mutual TLS), each key beside its certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

from netkit import need_tool


def make_pki(d: Path, *, dns: tuple[str, ...] = ("collector.test",), ips: tuple[str, ...] = (),
             client: str = "edge-bastion controller") -> dict[str, Path]:  # fmt: skip
    """ca.pem; server.pem/server.key for `dns` and `ips`; client.pem/client.key with CN
    `client`; all signed by the CA, valid for two days."""
    need_tool("openssl")
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=edge-bastion test CA")
    alt = ",".join([f"DNS:{n}" for n in dns] + [f"IP:{a}" for a in ips])
    (d / "server.ext").write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who, cn in (("server", dns[0] if dns else ips[0]), ("client", client)):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
            "client_cert": d / "client.pem", "client_key": d / "client.key"}
