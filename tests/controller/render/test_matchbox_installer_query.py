"""The matchbox example's installer (examples/matchbox/ignition/flatcar-install.yaml) is a bash
script that fetches the installed system's config with the request's own query. Whatever the
requester put in that query must reach curl as data, not be read by bash: `$(...)`, a backtick
or a quote in a query value passes the HTTP server unencoded, and inside a double-quoted URL
bash would run it in the installing node's shell. Through the real server (raw query bytes, as a
hostile client sends them), then the rendered curl line run by real bash against a stub curl."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import stat
import subprocess
import urllib.parse
from pathlib import Path

import pytest

BASH = shutil.which("bash") or "/bin/bash"  # found before PATH is only the stub
STRANGER = "52-54-00-aa-bb-cc"  # no group selects it: the default group's installer

# each ends up creating the file {marker} if bash runs any part of the value; redirection only,
# so no command on PATH is needed for it to work
HOSTILE = {
    "command-substitution": "$(>{marker})",
    "backtick": "`>{marker}`",
    "double-quote": '";>{marker};"',
    "single-quote": "';>{marker};'",
    "quoted-substitution": "\"'$(>{marker})'\"",
}


def installer_from(server_port: int, raw_query: str) -> str:
    """/opt/installer as the server renders it for this query, sent byte for byte."""
    conn = http.client.HTTPConnection("127.0.0.1", server_port, timeout=30)
    try:
        conn.request("GET", f"/ignition?{raw_query}")
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert r.status == 200, body[:500]
    config = json.loads(body)
    (source,) = [f["contents"]["source"] for f in config["storage"]["files"]
                 if f["path"] == "/opt/installer"]  # fmt: skip
    head, _, data = source.partition(",")
    if head.endswith(";base64"):
        return base64.b64decode(data).decode()
    return urllib.parse.unquote(data)


def stub_curl(bin_dir: Path, args_file: Path) -> None:
    """A curl that writes its arguments, one a line, and fetches nothing."""
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{args_file}'\n")
    curl.chmod(curl.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("hostile", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_query_value_reaches_the_installers_curl_as_data(hostile, matchbox_dir, serve, tmp_path):
    marker = tmp_path / "bash-ran-the-query"
    value = hostile.format(marker=marker)
    server = serve(matchbox_dir)
    installer = installer_from(server.port, f"mac={STRANGER}&foo={value}")

    # the whole script parses; then its curl line runs, with only the stub on PATH
    script = tmp_path / "installer"
    script.write_text(installer)
    parsed = subprocess.run([BASH, "-n", str(script)], check=False, capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    (line,) = [ln for ln in installer.splitlines() if ln.startswith("curl ")]
    args_file = tmp_path / "curl-args"
    stub_curl(tmp_path / "bin", args_file)
    only_the_stub = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}
    ran = subprocess.run([BASH, "-c", line], check=False, cwd=tmp_path, capture_output=True,
                         text=True, env=only_the_stub, timeout=30)  # fmt: skip
    assert not marker.exists(), f"bash ran part of the query: {line}"
    assert ran.returncode == 0, ran.stderr

    # curl got one URL, whose query reads back as the labels the request carried
    args = args_file.read_text().splitlines()
    assert args[:3] == ["--retry", "10", "--fail"] and args[4:] == ["-o", "ignition.json"], args
    url = urllib.parse.urlsplit(args[3])
    assert url.netloc == "matchbox.example.com:8080" and url.path == "/ignition"
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    assert query == {"os": ["installed"], "mac": [STRANGER.replace("-", ":")], "foo": [value]}

