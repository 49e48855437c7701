"""Debian's rsyslog as a log collector for the tests: `rsyslogd -n` in a network namespace,
listening on 127.0.0.1:PORT with imtcp (octet-counted framing as bastion.logship sends it), and
writing each message's MSGID, severity, structured data and MSG to a file, from which a test reads
the event ids that arrived (in the order they arrived). Started and stopped by PID."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from bastion.lab.netns import Namespace, stop_process

PORT = 10514
_ID = re.compile(r'bastion@32473 id="(\d+)"')


class Rsyslog:
    """rsyslogd -n in `ns`, listening on 127.0.0.1:PORT, writing `MSGID SD` lines to `out`."""

    def __init__(self, ns: Namespace, workdir: Path, tls: dict[str, Path] | None = None,
                 tls_auth: str = "anon"):  # fmt: skip
        """tls: certkit.make_pki's files (gtls, RFC 5425); tls_auth: its StreamDriver.AuthMode,
        "anon" (any client) or "x509/certvalid" (only a client with a certificate from the CA)."""
        self.ns, self.dir = ns, workdir
        self.out = workdir / "received.log"
        (workdir / "work").mkdir(parents=True, exist_ok=True)
        driver = ""
        tls_global = ""
        if tls:
            tls_global = (f'global(DefaultNetstreamDriverCAFile="{tls["ca"]}" '
                          f'DefaultNetstreamDriverCertFile="{tls["cert"]}" '
                          f'DefaultNetstreamDriverKeyFile="{tls["key"]}")\n')  # fmt: skip
            driver = f' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="{tls_auth}"'
        self.conf = workdir / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{workdir / "work"}")\n{tls_global}'
            # messages read but not yet written still go to the file at a stop (default: 1.5 s)
            'main_queue(queue.timeoutShutdown="20000")\n'
            f'module(load="imtcp"{driver})\n'
            f'input(type="imtcp" port="{PORT}" address="127.0.0.1")\n'
            'template(name="ids" type="string" string="%msgid% %syslogseverity% %structured-data% %msg%\\n")\n'
            f'action(type="omfile" file="{self.out}" template="ids" flushOnTXEnd="on" asyncWriting="off")\n'
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.ns.start(["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.dir / "pid")],
                                  name="rsyslogd", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 20
        while not self._listening():
            assert self.proc.poll() is None, "rsyslogd exited"
            assert time.monotonic() < deadline, "rsyslogd does not listen"
            time.sleep(0.05)

    def _listening(self) -> bool:
        r = self.ns.run("ss", "-H", "-n", "-l", "-t", f"sport = :{PORT}", capture_output=True, text=True)
        return bool(r.stdout.strip())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
            self.proc = None

    def ids(self) -> list[int]:
        if not self.out.exists():
            return []
        return [int(m.group(1)) for m in _ID.finditer(self.out.read_text())]
