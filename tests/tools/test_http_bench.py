"""tools/bench/http_bench.py: it runs, its servers answer correctly, and it cleans up after itself.

Behaviour only: no assertion looks at a latency or a throughput.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bastion.render import boot as scripts
from benchkit import REPO, interrupted, load, wait_gone

BENCH = REPO / "tools" / "bench" / "http_bench.py"
http_bench = load("http_bench")

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_peers = pytest.mark.skipif(
    not (os.access(NGINX, os.X_OK) and shutil.which("curl")),
    reason="needs nginx and curl (tools/setup installs nginx-light and curl)",
)


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-u", str(BENCH), "--nginx", NGINX, *args]


# --- the iPXE client's pure parts, against the controller's real /boot.ipxe script ------------


def test_chain_target_expands_the_controller_boot_script_as_ipxe_would():
    settings = {"mac": "52:54:00:be:00:01", "uuid": "u-1", "buildarch": "x86_64", "platform": "efi"}
    url = http_bench.chain_target(scripts.boot_script(), settings)
    assert url == (
        "ipxe?mac=52-54-00-be-00-01&uuid=u-1&arch=x86_64&platform=efi&hostname=&serial=&domain="
    )


def test_uristring_percent_encodes_what_would_break_the_query():
    assert (
        http_bench.expand_settings("${h:uristring}", {"h": "a b&c=d/é"}) == "a%20b%26c%3Dd%2F%C3%A9"
    )
    assert http_bench.expand_settings("${unset}|${unset:hexhyp}", {}) == "|"


@pytest.mark.parametrize("text", ["", "chain /x\n", "#!ipxe\nkernel /k\nboot\n", "#!ipxe\nchain\n"])
def test_chain_target_refuses_scripts_without_a_chain(text):
    with pytest.raises(ValueError):
        http_bench.chain_target(text, {})


# --- the storm client against a server that answers as told ---------------------------------

_BOOT = b"#!ipxe\nchain ipxe?mac=${mac:hexhyp}\n"
_PROFILE = f"#!ipxe\nkernel {http_bench.PROFILE_KERNEL}\nboot\n".encode()


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _boot_against(answers, dribble=False, late=None):
    """One boot_once against a loopback server whose answer to the n-th request on a
    connection is answers[n] (bytes; None: close the connection instead). dribble: each answer
    goes out a byte at a time. late: the boot was due that many seconds before it began (an
    open loop's). Returns (result, the request lines the server got)."""
    import asyncio
    import time

    got = []

    async def main():
        async def serve(reader, writer):
            for answer in answers:
                line = await reader.readline()
                got.append(line.decode().rstrip())
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                if answer is None:
                    break
                for i in range(len(answer) if dribble else 1):
                    writer.write(answer[i : i + 1] if dribble else answer)
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        result = http_bench.StormResult()
        machine = http_bench.machines_for(1, 1)[0]
        client = http_bench.StormClient(f"http://127.0.0.1:{port}")
        due = None if late is None else time.perf_counter() - late
        await http_bench.boot_once(client, machine, result, 5.0, due)
        server.close()
        return result

    return asyncio.run(main()), got


@pytest.mark.parametrize("dribble", [False, True])
def test_a_boot_follows_the_chain_on_the_same_connection_and_times_both_requests(dribble):
    result, got = _boot_against([_ok(_BOOT), _ok(_PROFILE)], dribble)
    assert got == ["GET /boot.ipxe HTTP/1.1", "GET /ipxe?mac=52-54-00-be-00-00 HTTP/1.1"]
    assert result.error_count == 0 and result.requests == 2
    assert [len(v) for v in result.latencies.values()] == [1, 1]


@pytest.mark.parametrize(
    "answers, error",
    [
        ([b"HTTP/1.1 200 OK\r\n\r\n#!ipxe"], "boot.ipxe: HttpError"),  # no Content-Length
        ([b"SPAM 200\r\nContent-Length: 0\r\n\r\n"], "boot.ipxe: HttpError"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"], "boot.ipxe: HttpError"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n#!ipxe"], "boot.ipxe: IncompleteReadError"),
        ([b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"], "boot.ipxe: HTTP 404"),
        ([_ok(b"#!ipxe\nboot\n")], "boot.ipxe: no chain command"),
        ([_ok(b"#!ipxe\nchain http://192.0.2.1/x\n")], "boot.ipxe: chain leaves the server under test (http://192.0.2.1/x)"),
        ([_ok(_BOOT), None], "ipxe: IncompleteReadError"),
        ([_ok(_BOOT), _ok(b"#!ipxe\nkernel /other\n")], "ipxe: not the bench profile's boot script"),
    ],
)  # fmt: skip
def test_a_wrong_or_cut_answer_is_counted_as_that_boots_error(answers, error):
    result, _ = _boot_against(answers)
    assert dict(result.errors) == {error: 1}


def _hold_answers(boots, cap, timeout, answer_after):
    """_open_share's boots at 1,000 a second on one machine, against a server that answers no
    request until it has `answer_after` connections open (None: never)."""
    import asyncio

    async def main():
        open_now = []
        enough = asyncio.Event()

        async def serve(reader, writer):
            open_now.append(writer)
            if answer_after is not None and len(open_now) >= answer_after:
                enough.set()
            try:
                while line := await reader.readline():
                    while (await reader.readline()) not in (b"\r\n", b""):
                        pass
                    await enough.wait()
                    writer.write(_ok(_BOOT) if line.startswith(b"GET /boot.ipxe") else _ok(_PROFILE))
                    await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        machine = http_bench.machines_for(1, 1)
        result = await http_bench._open_share(f"http://127.0.0.1:{port}", machine, range(boots),
                                              1000.0, timeout, cap)  # fmt: skip
        server.close()
        return result

    return asyncio.run(main())


def test_an_open_loop_begins_each_boot_when_due_not_when_the_last_was_answered():
    # The server answers only once all 6 boots have connected: a closed loop (one machine,
    # its next boot after its last answer) would wait for ever; the open loop begins all six.
    result = _hold_answers(boots=6, cap=6, timeout=30.0, answer_after=6)
    assert result.error_count == 0, result.errors
    assert result.requests == 12 and [len(v) for v in result.latencies.values()] == [6, 6]
    assert len(result.launch_lag) == 6


def test_an_open_loop_counts_the_boots_it_could_not_begin_past_its_cap():
    # Nothing is answered: the first two boots are in flight until they time out, and the
    # three due meanwhile (within 5 ms of the start) are not begun.
    result = _hold_answers(boots=5, cap=2, timeout=2.0, answer_after=None)
    assert dict(result.errors) == {"not begun: 2 boots of this client process in flight": 3,
                                   "boot.ipxe: TimeoutError": 2}  # fmt: skip
    assert http_bench.wrong_answers(result) == 0  # a server behind its load is not at fault


def test_a_boot_due_earlier_is_timed_from_when_it_was_due():
    # 30 s late: more than boot_once's 5 s timeout, so a chained request timed from `due`
    # could not pass, however slow the machine
    result, _ = _boot_against([_ok(_BOOT), _ok(_PROFILE)], late=30.0)
    assert result.error_count == 0
    assert result.latencies["boot.ipxe"][0] >= 30.0  # the time before it began counts
    assert result.latencies["ipxe"][0] < 30.0  # the chained request is timed on its own


def test_rates_are_positive_numbers_in_the_order_given():
    assert http_bench.parse_args(["--rates", "500,2000,1000.5"]).rates == [500.0, 2000.0, 1000.5]
    assert http_bench.parse_args([]).rates == []
    for bad in ("0", "-5", "fast", "100,,200", "nan", "inf"):
        with pytest.raises(SystemExit):
            http_bench.parse_args(["--rates", bad])
    with pytest.raises(SystemExit):
        http_bench.parse_args(["--rate-seconds", "0"])


def test_the_open_loops_capacity_is_the_highest_rate_that_met_the_goal_without_error():
    def step(ms, errors=0):
        r = http_bench.StormResult()
        r.latencies["boot.ipxe"] = [ms / 1000] * 100
        if errors:
            r.errors["boot.ipxe: TimeoutError"] += errors
        return r

    steps = [(500.0, step(5), step(1)), (1000.0, step(20), step(1)), (2000.0, step(50, errors=1), step(2)),
             (4000.0, step(400), step(80))]  # fmt: skip
    assert http_bench.open_loop_line(steps).endswith(
        "controller 1000 boots/s; nginx, the same client 4000 boots/s (of 500, 1000, 2000, 4000)")
    assert "controller none of them" in http_bench.open_loop_line([(500.0, step(150), step(1))])
    wrong = step(5)
    wrong.errors["ipxe: HTTP 500"] += 1
    assert http_bench.wrong_answers(wrong) == 1


def test_the_storm_goal_needs_the_p99_under_100_ms_and_no_error():
    def storm(*ms, errors=0):
        r = http_bench.StormResult()
        r.latencies["boot.ipxe"] = [m / 1000 for m in ms]
        r.errors["boot.ipxe: HttpError"] += errors
        return r

    assert http_bench.storm_goal(storm(*[5.0] * 98, 99.0, 99.0)) == (pytest.approx(0.099), True)
    assert http_bench.storm_goal(storm(*[5.0] * 99, 500.0))[1] is True  # one in 100 is over
    assert http_bench.storm_goal(storm(*[5.0] * 98, 100.0, 100.0))[1] is False  # the p99 is 100
    assert http_bench.storm_goal(storm(5.0, errors=1))[1] is False
    assert http_bench.storm_goal(storm())[1] is False  # no answer at all meets nothing
    line = http_bench.storm_goal_line(storm(50.0), storm(150.0), 1000)
    assert line.endswith("controller 50 ms, 0 errors: met; nginx, the same client 150 ms, 0 errors: MISSED")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert http_bench.percentile(values, 0.5) == 50.0
    assert http_bench.percentile(values, 0.99) == 99.0
    assert http_bench.percentile(values, 1.0) == 100.0
    assert http_bench.percentile([7.0], 0.99) == 7.0


def test_only_loopback_urls_count_as_loopback():
    assert http_bench.is_loopback_url("http://127.0.0.1:8080/ipxe")
    assert not http_bench.is_loopback_url("http://192.168.1.10/ipxe")
    assert not http_bench.is_loopback_url("http://example.com/ipxe")


# --- the whole bench, small ----------------------------------------------------------------------


DOC = REPO / "docs" / "benchmarks-http.md"


def doc_commands() -> list[list[str]]:
    """The arguments of each bench command in docs/benchmarks-http.md."""
    commands = []
    for line in DOC.read_text().splitlines():
        if line.startswith(".venv/bin/python tools/bench/http_bench.py"):
            commands.append(shlex.split(line)[2:])
    return commands


def test_the_ceiling_queues_a_whole_storms_connects_and_the_history_keeps_a_whole_run():
    # The default storm connects 1,000 clients at once: nginx's accept queue must hold them,
    # as uvicorn's does for the controller, or dropped handshakes cost 1 s each in its p99.
    # The check of what the controller recorded counts every event of the run: its history's
    # bound must not prune any (a fast machine's wrk phase alone is about 200,000 requests).
    conf = http_bench.nginx_config(Path("/run/b"), 8080, Path("/site"), Path("/canned"))
    m = re.search(rf"listen {re.escape(http_bench.HOST)}:8080 backlog=(\d+);", conf)
    assert m and int(m.group(1)) >= 2 * 1000
    cmd = http_bench.controller_command(Path("/site"), 8080, Path("/db"), None)
    assert int(cmd[cmd.index("--history-events") + 1]) >= 1_000_000
    from bastion.settings import parse_size

    assert parse_size(cmd[cmd.index("--history-size") + 1], "--history-size") >= 1_000_000 * 1024


def test_declared_machines_make_a_site_whose_groups_are_the_ones_the_check_expects(tmp_path):
    from bastion.site.load import load_site

    machines = http_bench.machines_for(12, 3, 5)
    http_bench.write_site(tmp_path / "site", machines, 1024)
    site = load_site(tmp_path / "site")
    assert [m.expected_group for m in machines].count("default") == 4
    for m in machines:  # each client's MAC selects the group the event check expects of it
        assert site.select_group({"mac": m.mac}).id == m.expected_group, m
    assert len(site.machines) == 5 and len({m.mac for m in machines}) == 12


@needs_peers
def test_a_storm_of_declared_machines_gets_each_machines_group(tmp_path):
    cmd = bench_command("--clients", "40", "--boots", "2", "--mac-groups", "4", "--machines", "30",
                        "--wrk", "none", "--asset-mb", "1", "--reps", "1")  # fmt: skip
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "group per MAC          ok" in run.stdout, run.stdout


@needs_peers
def test_an_open_loop_sweep_offers_each_rate_to_both_servers(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = bench_command("--clients", "40", "--boots", "1", "--wrk", "none", "--asset-mb", "1",
                        "--reps", "1", "--rates", "50,200", "--rate-seconds", "1",
                        "--json", str(out_json))  # fmt: skip
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    rows = re.findall(r"^ +(\d+) boot/s +(controller|nginx) +\d+ .* (\d+) +\d+\.\d\d +\d+\.\d ms",
                      out, re.MULTILINE)  # fmt: skip
    assert rows == [("50", "controller", "0"), ("50", "nginx", "0"),
                    ("200", "controller", "0"), ("200", "nginx", "0")], out  # fmt: skip
    assert re.search(r"^  capacity: the highest offered rate .*: controller (\d+ boots/s|none of them); "
                     r"nginx, the same client (\d+ boots/s|none of them) \(of 50, 200\)$", out, re.MULTILINE), out
    # every boot of the open loop was recorded by the controller, with the storm's
    assert "boot events recorded   ok" in out and "group per MAC          ok" in out, out
    summary = json.loads(out_json.read_text())
    steps = summary["open_loop"]
    assert [s["offered_boots_per_s"] for s in steps] == [50, 200]
    for s in steps:  # rate x seconds boots, two requests each
        for server in ("controller", "nginx"):
            assert s[server]["requests"] == 2 * s["offered_boots_per_s"], s
            assert s[server]["boot.ipxe"]["n"] == s["offered_boots_per_s"], s
            assert s[server]["errors"] == {} and "client_late_p99_ms" in s[server], s
    assert summary["failed"] is False


def test_every_command_in_the_doc_is_valid():
    commands = doc_commands()
    assert len(commands) == 3
    assert any("--rates" in args for args in commands)
    for args in commands:
        http_bench.parse_args(args)


@needs_peers
def test_the_docs_quick_run_succeeds_with_no_errors_and_prints_the_ratio(tmp_path):
    quick = [args for args in doc_commands() if "--clients" in args]
    assert quick == [["--clients", "50", "--asset-mb", "4", "--reps", "1", "--wrk-seconds", "1"]]
    out_json = tmp_path / "bench.json"
    cmd = bench_command(*quick[0], "--json", str(out_json))
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    storm = re.search(
        r"boot storm, controller: 50 clients x 5 boots, 2 client processes, (\d+) requests .* (\d+) errors",
        out,
    )
    assert storm and storm.group(1) == "500" and storm.group(2) == "0", out
    if shutil.which("wrk"):
        rates = re.findall(r"^  (controller|nginx) +(\d+) requests/s .* (\d+) errors", out, re.MULTILINE)
        assert [(name, errors) for name, _, errors in rates] == [("controller", "0"), ("nginx", "0")], out
        assert all(int(rate) > 0 for _, rate, _ in rates), out
    assert re.search(r"^asset throughput ratio controller/nginx: \d+\.\d+$", out, re.MULTILINE), out
    goal = re.search(r"^  goal: the first request's p99 under 100 ms .*: controller \d+ ms, 0 errors: "
                     r"(met|MISSED); nginx, the same client \d+ ms, 0 errors: (met|MISSED) "
                     r"\(this storm had 50 clients: not the goal's\)$", out, re.MULTILINE)  # fmt: skip
    assert goal, out
    for check in ("full GET       ok   200", "Range          ok   206", "If-None-Match  ok   304"):
        assert f"controller {check}" in out, out
    assert "group per MAC          ok" in out, out
    assert out.rstrip().endswith("result: ok"), out
    summary = json.loads(out_json.read_text())
    assert summary["storm"]["controller"]["errors"] == {}
    assert summary["storm"]["controller"]["requests"] == 500
    # the controller's group commit during the storm, from its /metrics: one event a request
    commits = summary["storm"]["controller"]["history_commits"]
    assert commits["events"] == 500 and 1 <= commits["transactions"] <= 500, commits
    assert summary["storm"]["nginx"]["history_commits"] is None
    line = re.search(r"^  history: 500 events in (\d+) transactions of the group commit, "
                     r"\d+\.\d a transaction$", out, re.MULTILINE)  # fmt: skip
    assert line and int(line.group(1)) == commits["transactions"], out
    assert summary["failed"] is False


@needs_peers
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupted_run_stops_every_server_it_started(sig):
    # Big enough that it is still running (checks or boot storm) when the signal arrives.
    cmd = bench_command("--clients", "500", "--boots", "50", "--asset-mb", "1", "--reps", "1")
    out = interrupted(cmd, lambda line: "boot storm" in line
                      or line.startswith("behaviour of the asset endpoint"), sig)
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 2, out
    assert wait_gone(pids) == []
    tmp = re.search(r"^bench dir (\S+):", out, re.MULTILINE)
    assert tmp and not Path(tmp.group(1)).exists(), out
