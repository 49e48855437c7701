"""A lab node's boot checked against what it was told: the timeline (bastion.state.boottrace,
shared with the dashboard) and what Ignition was told to write against what the node reported.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

# The lab reads its boots through this module: trace.timeline, trace.first, trace.Step.
from bastion.state.boottrace import Step, first, node_addresses, payload, timeline

__all__ = ["Step", "check_callback", "digest_of", "expected_files", "first", "node_addresses",
           "timeline"]

RESULT_FILE = "/etc/.ignition-result.json"  # Ignition's per-boot record: not config content


# --- what Ignition was told to write --------------------------------------------------------
def _data_url(source: str) -> bytes:
    head, _, data = source.partition(",")
    if not head.startswith("data:"):
        raise ValueError(f"only data: URLs are checked here, not {head[:20]!r}")
    if head.endswith(";base64"):
        return base64.b64decode(data)
    return urllib.parse.unquote_to_bytes(data)


def expected_files(ignition: dict) -> dict[str, str]:
    """{path: sha256} of every file and unit the Ignition config tells the files stage to
    write (data: URL contents, gzip-free, as the lab's configs are)."""
    out: dict[str, str] = {}
    for f in (ignition.get("storage") or {}).get("files") or []:
        contents = f.get("contents") or {}
        if contents.get("compression"):
            raise ValueError(f"{f['path']}: compressed contents are not checked here")
        data = _data_url(contents.get("source") or "data:,")
        out[f["path"]] = hashlib.sha256(data).hexdigest()
    for u in (ignition.get("systemd") or {}).get("units") or []:
        if "contents" in u:
            out[f"/etc/systemd/system/{u['name']}"] = hashlib.sha256(
                u["contents"].encode()).hexdigest()
    return out


def digest_of(files: dict[str, str]) -> str:
    """The lab initrd's digest: sha256 of its sorted `sha256  /path` lines, without the
    per-boot result file."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(files.items()) if p != RESULT_FILE)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def check_callback(callback: dict, ignition: dict) -> list[str]:
    """What is wrong with a node's report against its Ignition config (empty: all good)."""
    p = payload(callback)
    problems = []
    if p.get("status") != "ok":
        problems.append(f"status {p.get('status')!r}: {p.get('message', '')}")
    files = p.get("files") or {}
    for path, want in expected_files(ignition).items():
        got = files.get(path)
        if got != want:
            problems.append(f"{path}: the node wrote {got or 'nothing'}, the config says {want}")
    if p.get("digest") != digest_of(files):
        problems.append(f"digest {p.get('digest')} does not match the files reported")
    return problems
