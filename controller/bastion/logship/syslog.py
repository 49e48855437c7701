"""Syslog out: an event as an RFC 5424 message, framed by octet counting (RFC 6587 section
3.4.1) for TCP, and the TCP or TLS (RFC 5425) connection that carries it.

A message (RFC 5424 section 6):

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [bastion@32473 id="12" ...] MSG

- PRI = facility * 8 + severity (section 6.2.1). Severity is a journal entry's own PRIORITY,
  err for an HTTP status of 500 or more, warning for an event whose payload carries `error`,
  info otherwise.
- TIMESTAMP is the event's time, UTC, microseconds (section 6.2.3); NILVALUE for a time no
  TIMESTAMP can say.
- APP-NAME `edge-bastion`, PROCID `-`, MSGID the event's kind (section 6.2.7: 1..32
  printable ASCII characters).
- STRUCTURED-DATA: one element, `bastion@32473` (32473 is the enterprise number RFC 5612
  reserves for examples and documentation; a private SD-ID needs one) with the event's id,
  source, site and, when known, machine, mac, endpoint, status. Values escape `"`, `\\` and `]`
  (section 6.3.3).
- MSG is the whole event as JSON (MSG-ANY, no BOM): a collector that keeps only MSG keeps
  everything.

Over TCP each message goes as `LEN SP MESSAGE` (octet counting), which rsyslog, syslog-ng and
others read without depending on newlines inside MSG.

Plain TCP syslog has no acknowledgement: bytes a collector's kernel accepted can still be lost
when the collector stops before reading them. `SyslogConnection` gives the sender what it needs
to be safe anyway: `unacked()` (bytes the peer's kernel has not acknowledged, SIOCOUTQ) and
`closed_by_peer()` (a FIN or RST has come back); bastion.logship.shipper keeps records in its
queue until they were acknowledged and the connection stayed open for a while after.
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import ssl
import struct
import termios
from datetime import UTC, datetime
from typing import Any

from bastion.logship import longest

APP_NAME = "edge-bastion"
SD_ID = "bastion@32473"
_SEVERITY_ERR, _SEVERITY_WARNING, _SEVERITY_INFO = 3, 4, 6
_SD_FIELDS = ("id", "source", "machine", "mac", "endpoint", "status")


def _sd_escape(value: Any) -> str:
    # RFC 5424 section 6.3.3: '"', '\' and ']' are escaped with a backslash inside PARAM-VALUE
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(text: str, limit: int) -> str:
    # HOSTNAME, APP-NAME, MSGID: PRINTUSASCII (33..126), at most `limit` characters, else NILVALUE
    out = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return out or "-"


def severity(event: dict[str, Any]) -> int:
    payload = event.get("payload")
    if event.get("kind") == "journal" and isinstance(payload, dict):
        p = payload.get("priority")
        if isinstance(p, int) and 0 <= p <= 7:  # the journal's PRIORITY is syslog's severity
            return p
    status = event.get("status")
    if isinstance(status, int) and status >= 500:
        return _SEVERITY_ERR
    payload = event.get("payload")
    if isinstance(payload, dict) and payload.get("error"):
        return _SEVERITY_WARNING
    return _SEVERITY_INFO


def timestamp(ts: Any) -> str:
    """The event's time, UTC; NILVALUE when it is not one a TIMESTAMP can say (section 6.2.3:
    FULL-DATE has a four-digit year). Never raises: a record that cannot be formatted would be
    retried forever and block every record queued behind it."""
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (TypeError, ValueError, OverflowError, OSError):  # past year 9999, NaN, not a number
        return "-"


def message(event: dict[str, Any], *, hostname: str, facility: int, site: str,
            max_bytes: int | None = None) -> bytes:  # fmt: skip
    """One event (Event.as_dict()) as an RFC 5424 message, without framing, cut to `max_bytes`
    as `fit_message` cuts it."""
    return fit_message(event, hostname=hostname, facility=facility, site=site, max_bytes=max_bytes)[0]


def fit_message(event: dict[str, Any], *, hostname: str, facility: int, site: str,
                max_bytes: int | None = None) -> tuple[bytes, bool]:  # fmt: skip
    """One event (Event.as_dict()) as an RFC 5424 message, without framing, and whether it had
    to be cut (bastion_logship_cut_total counts those). With `max_bytes`, a longer message is cut to fit and stays RFC 5424 with MSG valid JSON: a collector truncates an
    oversize message itself, mid-JSON (rsyslog's default limit is 8096 bytes, and it reads the
    cut-off rest as more, bogus, messages). First the payload is replaced by `{"truncated": <its
    JSON's length>, "head": <the start of that JSON>}`; when that is not enough (a long machine
    name, endpoint or site), each structured-data value but the id is cut to at most
    `SD_VALUE_CUT` characters, fewer if need be, and MSG is `{"truncated": <the event's JSON's
    length>, "head": <its start>}`. Any event fits 480 bytes (the schema's least max_message)
    that way: PRI to MSGID take at most 339 bytes, the structured data with its values cut to
    nothing 99 (its id an integer of up to 19 digits), MSG about 35."""
    pri = facility * 8 + severity(event)
    fields = [(name, str(event[name])) for name in _SD_FIELDS if event.get(name) is not None]
    fields.insert(min(2, len(fields)), ("site", str(site)))
    start = (f"<{pri}>1 {timestamp(event.get('ts') or 0)} {_printable(hostname, 255)} "
             f"{APP_NAME} - {_printable(str(event.get('kind') or ''), 32)} ").encode()  # fmt: skip

    def sd(cut: int | None = None) -> bytes:
        params = " ".join(f'{name}="{_sd_escape(value if cut is None or name == "id" else value[:cut])}"'
                          for name, value in fields)  # fmt: skip
        return _utf8(f"[{SD_ID} {params}] ")

    head = start + sd()
    body = _json(event)
    if max_bytes is None or len(head) + len(body) <= max_bytes:
        return head + body, False
    text = json.dumps(event.get("payload"), separators=(",", ":"), ensure_ascii=False, default=str)
    short = dict(event, payload={"truncated": len(text), "head": ""})
    if len(head) + len(_json(short)) <= max_bytes:
        room = max_bytes - len(head)
        return head + longest(lambda n: _json(dict(short, payload={"truncated": len(text), "head": text[:n]})),
                              len(text), lambda m: len(m) <= room), True  # fmt: skip
    whole = body.decode()
    sd_room = max_bytes - len(start) - len(_json({"truncated": len(whole), "head": ""}))
    head = start + longest(sd, SD_VALUE_CUT, lambda m: len(m) <= sd_room)
    room = max_bytes - len(head)
    return head + longest(lambda n: _json({"truncated": len(whole), "head": whole[:n]}), len(whole),
                          lambda m: len(m) <= room), True  # fmt: skip


SD_VALUE_CUT = 64  # characters of a structured-data value kept when the message must be cut that far


def _json(value: Any) -> bytes:
    return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


_SURROGATE = re.compile("[\ud800-\udfff]")  # the queue's json.loads joins pairs: any left is alone


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, each lone surrogate as U+FFFD (as the history answers it). A str with
    one is not Unicode text (a file name that os.fsdecode made of bytes that are not UTF-8, for
    one); encoding it strictly raised, and the message was retried forever, every record queued
    behind it waiting."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


def frame(msg: bytes) -> bytes:
    """RFC 6587 section 3.4.1, octet counting: MSG-LEN SP SYSLOG-MSG."""
    return b"%d %s" % (len(msg), msg)


class SyslogConnection:
    """A connected TCP socket, TLS-wrapped when given a context; `sendall` whole frames."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None, timeout: float = 10.0):  # fmt: skip
        self.timeout = timeout
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock: socket.socket = (
                tls.wrap_socket(raw, server_hostname=server_name or host) if tls is not None else raw
            )
        except BaseException:
            raw.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def unacked(self) -> int:
        """Bytes sent that the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
        # the TLS socket owns the descriptor once wrapped (the raw one is detached)
        buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    def closed_by_peer(self) -> bool:
        """True when the collector has closed or reset the connection. Syslog collectors never
        send data, so a readable socket means a FIN (b''), an RST (an error) or, with TLS 1.3, a
        session ticket that the TLS layer takes in (then it is still open)."""
        self.sock.setblocking(False)
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                data = self.sock.recv(1)
            else:
                data = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:  # ECONNRESET, a TLS alert, close_notify (SSLZeroReturnError)
            return True
        finally:
            self.sock.settimeout(self.timeout)
        return data == b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ClientCertificateError(OSError):
    """The client certificate and its key do not load together (`tls_context`)."""


def tls_context(ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None) -> ssl.SSLContext:  # fmt: skip
    """A client context that checks the collector's certificate against `ca_file` (None: the
    system's CAs) and its name, and presents `cert_file` with `key_file` when given (mutual
    TLS). TLS 1.2 at least. A key protected by a passphrase does not load
    (ClientCertificateError), like one that does not match the certificate."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        asked = []

        def no_passphrase() -> bytes:
            # without a callback OpenSSL asks for the passphrase on the controlling terminal,
            # and the thread that asked waits there for good
            asked.append(True)
            return b""

        try:
            ctx.load_cert_chain(cert_file, key_file, password=no_passphrase)
        except ssl.SSLError as e:
            raise ClientCertificateError(
                "the key is protected by a passphrase, which the controller has no way to give: store it "
                "without one" if asked else str(e)) from None  # fmt: skip
    return ctx
