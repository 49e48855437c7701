"""The command line given bad input: a one-line error and nothing damaged, never a traceback,
and never an action on something other than what was named (an audit's findings, each
checked here against the real commands)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from bastion_testkit import TOKEN

BIN = Path(sys.executable).parent


def bastion(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True, timeout=120,
                          check=False, env=env)  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_a_machine_name_names_that_machine_only(site_dir, serve, tmp_path):
    server = serve(site_dir)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    for name in ("node1/../node2", "node2?x=1", "node2#x", "../machines/node2"):
        r = bastion("machine", "hold", "--url", server.url, "--token-file", str(token), "--", name)
        assert "not found" in one_line_error(r).lower() or "404" in one_line_error(r), (name, r.stderr)
    def phases() -> dict[str, str]:
        return {m["name"]: m["phase"] for m in server.get("/api/v1/machines").json()}

    assert "Held" not in phases().values(), phases()
    r = bastion("machine", "hold", "--url", server.url, "--token-file", str(token), "--", "node2")
    assert r.returncode == 0, r.stderr
    assert [n for n, p in phases().items() if p == "Held"] == ["node2"]  # the check above can see a hold
    r = bastion("machine", "status", "--url", server.url, "--", "a\nb")
    assert one_line_error(r) == "Error: 'a\\nb' is not a name: it has a control character"
    # '' was asked as /api/v1/machines/ and answered "not JSON (HTTP 307)"
    r = bastion("machine", "status", "--url", server.url, "--", "")
    assert one_line_error(r) == "Error: an empty name names nothing"
    # bytes that are not UTF-8 (a lone surrogate in Python's argv) were "a control character"
    r = subprocess.run([str(BIN / "bastion"), "machine", "status", "--url", server.url, "--", b"node\xff"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "is not a name: it is not UTF-8 text" in one_line_error(r), r.stderr


def test_urls_that_are_not_urls(tmp_path):
    for args in (("machines",), ("status",), ("events",), ("machine", "status", "node1")):
        r = bastion(*args, "--url", "http://127.0.0.1:abc")
        assert "Invalid port: 'abc'" in one_line_error(r), (args, r.stderr)


def test_a_token_file_that_is_not_text(tmp_path):
    bad = tmp_path / "token"
    bad.write_bytes(bytes(range(128, 256)))
    r = bastion("machine", "hold", "node1", "--url", "http://127.0.0.1:9", "--token-file", str(bad))
    assert one_line_error(r) == f"Error: the API token file {bad} is not text (UTF-8)"


def test_events_leaves_a_file_that_is_not_its_history_alone(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
        c.execute("PRAGMA user_version = 42")
    before = other.read_bytes()
    r = bastion("events", "--db", str(other))
    assert one_line_error(r) == f"Error: {other} is not an event history: it has no events table"
    assert other.read_bytes() == before
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n")
    r = bastion("events", "--db", str(text))
    assert one_line_error(r) == f"Error: {text} is not an event history: file is not a database"
    assert text.read_text() == "not a database at all\n"


def test_events_reads_a_history_it_may_not_write_and_writes_nothing_to_it(tmp_path):
    # It opened the history as the controller does: the journal mode and the schema were set
    # again (a history kept in another journal mode came back in WAL), and on a file it could
    # not write that was a traceback ("attempt to write a readonly database").
    from bastion.state.events import EventStore

    db = tmp_path / "h.db"
    store = EventStore(db)
    for i in range(3):
        store.record("boot", endpoint="/ipxe", payload={"n": i})
    store.close()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    before = db.read_bytes()
    r = bastion("events", "--db", str(db), "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["payload"]["n"] for line in r.stdout.splitlines()] == [1, 2]
    assert db.read_bytes() == before and not Path(f"{db}-wal").exists()
    if shutil.which("chattr") is None:  # e2fsprogs, Priority: required in Debian
        pytest.skip("no chattr")
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True, check=False).returncode != 0:
        pytest.skip(f"chattr +i does not work on {tmp_path}'s file system")
    try:  # not even root may write it now
        r = bastion("events", "--db", str(db), "-n", "1", "--json")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert r.returncode == 0 and json.loads(r.stdout)["payload"]["n"] == 2, r.stderr


def test_a_reader_that_stops_early_is_no_error_to_report(tmp_path):
    # `bastion events | head -1`: "Error: [Errno 32] Broken pipe" on stderr
    from bastion.state.events import EventStore

    store = EventStore(tmp_path / "h.db")
    store.record_many([("boot", {"endpoint": "/ipxe", "payload": {"pad": "x" * 200}})] * 2000)
    store.close()
    p = subprocess.Popen([str(BIN / "bastion"), "events", "--db", str(tmp_path / "h.db"), "-n", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout.readline().startswith(b"     1  ")
    p.stdout.close()  # as head does after its line
    assert p.wait(timeout=120) == 1
    assert p.stderr.read() == b""


def test_a_console_wait_of_nan_seconds_is_refused():
    # NaN passed float and every comparison with it: a console whose stdin ended never left
    r = bastion("console", "node1", "--url", "http://127.0.0.1:9", "--after-eof", "nan")
    assert r.returncode == 2 and "--after-eof" in r.stderr and "nan" in r.stderr, r.stderr


def test_the_controllers_own_problems_are_words_not_a_dict():
    from bastion.client import validation_words

    detail = {"message": "the site files do not load", "problems": ["machines.yaml:3: relay 99: at most 31",
                                                                   "groups/a.json: bad"]}  # fmt: skip
    assert validation_words(detail) == ("the site files do not load: machines.yaml:3: relay 99: at most "
                                        "31; groups/a.json: bad")  # fmt: skip
    assert validation_words({"message": "the edit would break the site"}) == "the edit would break the site"
    assert validation_words("no machine 'x'") == "no machine 'x'"


def test_install_service_refuses_a_name_or_value_that_would_leave_its_place(tmp_path):
    root = tmp_path / "root"
    site = Path(__file__).resolve().parents[2] / "examples" / "site"
    for args, says in ((("--name", "../../../escape"), "--name '../../../escape': a unit name is"),
                       (("--name", ""), "--name '': a unit name is"),
                       (("--device", "/dev/tty\nExecStartPre=/bin/touch /tmp/x"), "a control character cannot go"),
                       # written as given, it named a file in the service's working directory
                       (("--device", "ttyACM0"), "--device ttyACM0: the service needs the serial line's absolute path")):  # fmt: skip
        r = bastion("install-service", "--site", str(site), "--root", str(root), "--no-systemctl", *args)
        assert says in one_line_error(r), (args, r.stderr)
    assert not root.exists() and not (tmp_path / "escape.conf").exists()


def test_a_path_through_a_file_is_a_one_line_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = bastion("fleet", "crds", "-o", str(afile / "crds"))
    assert one_line_error(r) == f"Error: {afile / 'crds'}: Not a directory"


def test_a_site_file_that_cannot_be_read_is_a_problem_named_not_a_missing_file(tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "site", site)
    (site / "machines.yaml").unlink()
    (site / "machines.yaml").mkdir()  # was read as no machines.yaml: "OK: 0 machines"
    r = bastion("site", "check", str(site))
    assert r.returncode == 1 and "machines.yaml: is a directory, not a file" in r.stdout + r.stderr, r.stdout
    (site / "machines.yaml").rmdir()
    (site / "site.yaml").unlink()
    (site / "site.yaml").symlink_to("site.yaml")  # a loop: ELOOP (root reads any mode)
    r = bastion("site", "check", str(site))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "site.yaml: cannot be read: Too many levels of symbolic links" in r.stdout + r.stderr, r.stdout
    (site / "site.yaml").unlink()
    os.mkfifo(site / "site.yaml")  # read, it would wait for a writer for ever
    r = bastion("site", "check", str(site))
    assert r.returncode == 1 and "site.yaml: is not a regular file" in r.stdout + r.stderr, r.stdout


def test_fleet_resources_refuses_what_kubernetes_would(tmp_path):
    site = str(Path(__file__).resolve().parents[2] / "examples" / "site")
    ok = ("--name", "home-lab", "--namespace", "edge-sites", "--controller-url", "http://10.200.0.1:8080")
    assert bastion("fleet", "resources", site, *ok).returncode == 0
    for i, bad, says in ((1, "Bad Name!", "--name: 'Bad Name!': a site's name is"),
                         (3, "NS/..", "--namespace: 'NS/..': a namespace"),
                         (5, "notaurl", "--controller-url: 'notaurl' is not an http(s) URL"),
                         (5, "http://[::1", "--controller-url: 'http://[::1': Invalid IPv6 URL"),
                         (5, "http://h:99999", "'http://h:99999': Port out of range"),
                         (5, "http://:80", "'http://:80' is not an http(s) URL"),
                         # RFC 1123 has no empty label, and the name is its Machines' label value
                         (1, "a..b", "--name: 'a..b': a site's name is"),
                         (1, "a" * 64, "at most 63 (it labels its Machines)")):  # fmt: skip
        args = list(ok)
        args[i] = bad
        assert says in one_line_error(bastion("fleet", "resources", site, *args)), bad
    # machines.yaml allows upper case and '_' in a name; the API server does not
    import shutil

    shutil.copytree(site, tmp_path / "site")
    text = (tmp_path / "site" / "machines.yaml").read_text()
    (tmp_path / "site" / "machines.yaml").write_text(text.replace("  - name: node1", "  - name: Node_1"))
    assert bastion("site", "check", str(tmp_path / "site")).returncode == 0
    r = bastion("fleet", "resources", str(tmp_path / "site"), *ok)
    assert one_line_error(r) == ("Error: machines.yaml: machine 'Node_1' cannot be a Kubernetes Machine's "
                                 "name (lower-case letters, digits, '-' and '.'): rename it to publish "
                                 "the site as resources")  # fmt: skip


def test_a_url_that_is_not_a_controller_is_said_in_one_bounded_line(tmp_path):
    import http.server
    import threading

    (tmp_path / "index.html").write_text("<html>" + "x" * 5000 + "</html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        line = one_line_error(bastion("machine", "status", "node1", "--url", url))
        assert line.startswith(f"Error: {url}: not an Edge Bastion controller's answer to GET "
                               "/api/v1/machines/node1: <!DOCTYPE HTML>"), line  # fmt: skip
        assert len(line) < 400 and line.endswith("(HTTP 404)"), line
    finally:
        srv.shutdown()


def test_a_number_of_seconds_that_is_not_a_number_is_refused():
    # click's FloatRange lets NaN through any bound: every comparison with it is false.
    for cmd in (("registry-cache", "run", "--site", ".", "--check-every"),
                ("registry-cache", "run", "--site", ".", "--restart-after"),
                ("machines", "--interval")):  # fmt: skip
        for bad in ("nan", "-NaN"):
            r = bastion(*cmd, bad)
            assert f"'{cmd[-1]}': '{bad}' is not a number." in one_line_error(r), (cmd, r.stderr)


def test_events_follow_from_now_and_a_negative_count_is_refused(site_dir, serve):
    # `-n 0 -f` asked for nothing, then followed from id 0 asking for 0 at a time: it never
    # printed an event; `-n -5` printed nothing and said nothing.
    server = serve(site_dir)
    assert server.get("/boot.ipxe").status_code == 200  # an old event, not to be shown
    assert one_line_error(bastion("events", "--url", server.url, "-n", "-5")) == (
        "Error: Invalid value for '-n' / '--limit': -5 is not in the range 0<=x<=10000.")
    follow = subprocess.Popen([str(BIN / "bastion"), "events", "--url", server.url, "-n", "0", "-f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        import time

        time.sleep(2)  # its first fetch is done: what comes now is new
        assert server.get("/ipxe", params={"mac": "52:54:00:12:34:01"}).status_code == 200
        import select

        assert select.select([follow.stdout], [], [], 30)[0], "nothing printed in 30 s"
        line = follow.stdout.readline()
        assert "boot" in line and "/ipxe" in line, line
    finally:
        follow.kill()
        follow.wait()
    assert server.get("/api/v1/events", params={"limit": -1}).status_code == 422


def test_an_api_validation_error_is_said_in_words(site_dir, serve):
    # a 422's pydantic list came through as a Python repr: [{'type': 'less_than_equal', ...}]
    import pytest
    from bastion.client import ApiClient, ApiError

    server = serve(site_dir)
    with pytest.raises(ApiError) as e:
        ApiClient(server.url, timeout=10).call("GET", "/api/v1/events", params={"limit": -1, "after": "x"})
    assert str(e.value) == ("limit: Input should be greater than or equal to 0; after: Input should "
                            "be a valid integer, unable to parse string as an integer (HTTP 422)")


@pytest.fixture
def json_server():
    """json_server(body) -> the URL of a web server on 127.0.0.1 that answers `body` (JSON, 200)
    to every GET and POST: something that answers JSON and is not a controller."""
    import http.server
    import threading

    servers = []

    def start(body: bytes) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

            def log_message(self, *args) -> None:  # not the test's output
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_a_server_that_answers_json_but_not_a_controllers_is_a_one_line_error(json_server):
    # `{}` or `[]` with status 200 was a KeyError traceback (machines, plan, machine list), or
    # "device on None" and status 0 (status)
    url = json_server(b"{}")
    for args, call, problem in [
        (("machines",), "GET /api/v1/operator", "it has no 'machines'"),
        (("plan",), "GET /api/v1/plan", "it has no 'id'"),
        (("apply",), "GET /api/v1/plan", "it has no 'id'"),
        (("machine", "list"), "GET /api/v1/machines", "it is an object, not an array"),
        (("machine", "status", "node1"), "GET /api/v1/machines/node1", "it has no 'name'"),
        (("machine", "reprovision", "node1"), "POST /api/v1/machines/node1/reprovision",
         "it has no 'changed'"),
        (("machine", "hold", "node1"), "POST /api/v1/machines/node1/hold", "it has no 'machine'"),
        (("status",), "GET /api/v1/device", "it has no 'port'"),
        (("power", "on", "node1"), "POST /api/v1/machines/node1/power", "it has no 'channel'"),
    ]:  # fmt: skip
        line = one_line_error(bastion(*args, "--url", url))
        assert line == f"Error: {url}: not an Edge Bastion controller's answer to {call}: {problem}", line
    url = json_server(b"[]")
    for args, call in [(("machines",), "GET /api/v1/operator"), (("plan",), "GET /api/v1/plan"),
                       (("status",), "GET /api/v1/device")]:  # fmt: skip
        line = one_line_error(bastion(*args, "--url", url))
        assert line.endswith(f"answer to {call}: it is an array, not an object"), line
    url = json_server(b'{"machines": [{"name": "node1"}]}')
    line = one_line_error(bastion("machines", "--url", url))
    assert line.endswith("answer to GET /api/v1/operator: machines[0] has no 'status'"), line


def test_an_empty_array_from_a_server_that_is_not_a_controller_is_no_site(json_server, serve, site_dir):
    # `[]` passed for an empty site (a table with no rows, exit 0) and an empty history
    url = json_server(b"[]")
    for args, call in [(("machine", "list"), "GET /api/v1/machines"),
                       (("events",), "GET /api/v1/events")]:  # fmt: skip
        line = one_line_error(bastion(*args, "--url", url))
        assert line == (f"Error: {url}: not an Edge Bastion controller's answer to {call}: an empty "
                        "array, and the answer to GET /api/v1/site is not a controller's: it is an "
                        "array, not an object"), line  # fmt: skip
    # a controller's own empty arrays are still an empty site and no events
    (site_dir / "machines.yaml").write_text("machines: []\n")
    server = serve(site_dir)
    r = bastion("machine", "list", "--json", "--url", server.url)
    assert (r.returncode, json.loads(r.stdout)) == (0, []), r.stderr
    r = bastion("events", "--kind", "no-such-kind", "--url", server.url)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
