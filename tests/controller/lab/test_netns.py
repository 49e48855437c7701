"""bastion.lab.netns: processes stopped by PID with a grace period, and only while the PID is
still theirs; a supervisor that a later run can load to stop exactly what an earlier one started;
the SIGINT/SIGTERM/SIGHUP-safe cleanup; namespaces that are made with only `lo` and removed with
everything inside them, also when the code using them fails.

No assertion looks at a time: the timeouts only guard against a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bastion.lab import netns
from bastion.lab.netns import LabError, LabNet, Namespace, Supervisor

# Ignores SIGTERM and forks a child into its own process group; prints the child's PID.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    print(child.pid, flush=True)
    time.sleep(300)
""")
SLEEPER = ["sleep", "300"]


def gone(pid: int) -> bool:
    st = netns._stat(pid)
    return st is None or st[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def inside(ns: str, pids: set[int], timeout: float = 10.0) -> set[int]:
    """The PIDs in namespace ns once all of `pids` are (`ip netns exec` takes a moment)."""
    deadline = time.monotonic() + timeout
    while not pids <= (found := set(netns.ns_pids(ns))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


# Two ends of a UDP exchange across namespaces (no ping on a minimal host).
ECHO = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind((sys.argv[1], 6969)); print('bound', flush=True); d, a = s.recvfrom(100); "
        "s.sendto(d, a)")
ASK = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
       "s.settimeout(10); s.sendto(b'hello', (sys.argv[1], 6969)); print(s.recvfrom(100)[0])")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_with_its_group():
    sup = Supervisor(grace=0.2)
    proc = sup.start("stubborn", [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    child = int(proc.stdout.readline())
    assert sup.alive("stubborn")
    sup.stop("stubborn")
    assert proc.returncode == -signal.SIGKILL
    assert wait_gone(child)  # what it forked went with its process group
    assert not sup.alive("stubborn") and sup.pids == {}


def test_a_process_that_stops_on_its_signal_ends_by_that_signal():
    sup = Supervisor()
    term = sup.start("term", SLEEPER)
    interrupt = sup.start("int", SLEEPER, stop_signal=signal.SIGINT)
    assert sup.stop_all() == [f"process int ({interrupt.pid})", f"process term ({term.pid})"]
    assert (term.returncode, interrupt.returncode) == (-signal.SIGTERM, -signal.SIGINT)
    assert sup.stop_all() == []  # nothing left, and saying so twice is fine


def test_a_stop_signal_this_program_ignores_still_stops_the_child():
    # A shell without job control starts background jobs with SIGINT ignored (CI may run the
    # suite so); the child must not inherit that, or SIGINT would never stop it.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "from bastion.lab.netns import Supervisor; sup = Supervisor(grace=5); "
            "p = sup.start('int', ['sleep', '300'], stop_signal=signal.SIGINT); "
            "sup.stop_all(); print(p.returncode)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == -signal.SIGINT


def test_a_child_reaped_behind_its_popen_is_never_signalled(monkeypatch):
    proc = subprocess.Popen(["true"])
    os.waitpid(proc.pid, 0)  # someone else reaped it: its PID may be a stranger's by now
    sent = []
    real_kill, real_killpg = os.kill, os.killpg
    monkeypatch.setattr(os, "kill", lambda pid, sig: (sent.append(pid), real_kill(pid, sig)))
    monkeypatch.setattr(os, "killpg", lambda pg, sig: (sent.append(pg), real_killpg(pg, sig)))
    netns.stop_process(proc, grace=0.1)
    assert sent == []
    assert netns.exited(proc)


def test_a_later_run_stops_what_an_earlier_one_recorded_and_nothing_else(tmp_path):
    state = tmp_path / "state.json"
    earlier = Supervisor(state)
    ours = earlier.start("ours", SLEEPER)
    other = earlier.start("reused", SLEEPER)
    recorded = json.loads(state.read_text())
    assert recorded["pids"] == {"ours": ours.pid, "reused": other.pid}
    assert recorded["cmds"]["ours"] == SLEEPER
    # As if "reused"'s PID now belonged to another process: its start time differs.
    recorded["starts"]["reused"] += 1
    state.write_text(json.dumps(recorded))
    try:
        later = Supervisor.load(state)
        assert later.alive("ours") and not later.alive("reused")
        assert later.stop_all() == [f"process ours ({ours.pid})"]
        assert ours.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None  # the process that is not ours runs on
        assert json.loads(state.read_text())["pids"] == {}
    finally:
        earlier.stop_all()
    assert other.returncode == -signal.SIGTERM


def test_a_broken_state_file_is_an_empty_supervisor(tmp_path):
    state = tmp_path / "state.json"
    for text in ("{", "[]", '{"pids": {"x": "not a pid"}}'):
        state.write_text(text)
        assert Supervisor.load(state).pids == {}


# --- run_with_cleanup, in a program of its own -------------------------------------------------

PROGRAM = textwrap.dedent("""
    import sys, time
    from bastion.lab.netns import run_with_cleanup

    def main():
        print("running", flush=True)
        time.sleep(60)
        return 0

    def cleanup():
        print("cleaning", flush=True)
        time.sleep(0.5)  # a second signal comes in here, and must change nothing
        print("cleaned", flush=True)

    sys.exit(run_with_cleanup(main, cleanup))
""")


@pytest.mark.parametrize("sig", netns.STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_each_stop_signal_interrupts_and_the_cleanup_runs_to_its_end(sig):
    # SIGINT ignored on entry, as in a program started in the background: it still interrupts.
    ignore_int = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    proc = subprocess.Popen([sys.executable, "-c", ignore_int + PROGRAM], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "running\n"
        proc.send_signal(sig)
        assert proc.stdout.readline() == "cleaning\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out == "cleaned\n" and "interrupted" in err and "Traceback" not in err, err


def test_run_with_cleanup_returns_mains_status_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in netns.STOP_SIGNALS}
    cleaned = []
    assert netns.run_with_cleanup(lambda: 3, lambda: cleaned.append(1)) == 3
    assert cleaned == [1]
    assert {s: signal.getsignal(s) for s in netns.STOP_SIGNALS} == before
    with pytest.raises(ValueError):
        netns.run_with_cleanup(lambda: int("x"), lambda: cleaned.append(2))
    assert cleaned == [1, 2]


def test_an_error_that_says_it_cannot_run_here_is_status_2(capsys):
    def main() -> int:
        raise LabError("ip netns add x: Operation not permitted")

    cleaned = []
    assert netns.run_with_cleanup(main, lambda: cleaned.append(1), errors=(LabError,)) == 2
    assert cleaned == [1]
    assert capsys.readouterr().err == "error: ip netns add x: Operation not permitted\n"


# --- namespaces (root) -------------------------------------------------------------------------


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


def name(tag: str) -> str:
    return f"ebns{os.getpid() % 100000}{tag}"


@pytest.mark.netns
def test_a_namespace_has_only_lo_and_goes_with_everything_in_it_when_the_code_fails():
    need_root()
    ns = Namespace(name("a"))
    stray = None
    with pytest.raises(RuntimeError, match="the test's own failure"), ns:
        assert ns.name in netns.namespaces()
        assert ns.ip("-o", "link").count("\n") == 1 and ": lo:" in ns.ip("-o", "link")
        supervised = ns.start(SLEEPER)
        # one it did not start itself (as a client a test runs would be)
        stray = subprocess.Popen(ns.argv(*SLEEPER), start_new_session=True)
        assert inside(ns.name, {supervised.pid, stray.pid}) == {supervised.pid, stray.pid}
        raise RuntimeError("the test's own failure")
    assert ns.name not in netns.namespaces()
    assert supervised.returncode == -signal.SIGTERM
    assert stray.wait(timeout=10) == -signal.SIGTERM
    assert ns.destroy() == []  # a second time: nothing left to remove


@pytest.mark.netns
def test_a_namespace_that_exists_is_never_adopted():
    need_root()
    with Namespace(name("b")) as first:
        with pytest.raises(LabError, match="exists"), Namespace(first.name):
            pass
        assert first.name in netns.namespaces()  # the failed one removed nothing
    assert first.name not in netns.namespaces()


@pytest.mark.netns
def test_veth_and_udp_bound(tmp_path):
    need_root()
    with Namespace(name("s")) as a, Namespace(name("c")) as b:
        a.veth("va", b, "vb")
        a.ip("addr", "add", "10.81.0.1/24", "dev", "va")
        a.ip("link", "set", "va", "up")
        b.ip("addr", "add", "10.81.0.2/24", "dev", "vb")
        b.ip("link", "set", "vb", "up")
        assert not a.udp_bound(6969)
        echo = a.start([sys.executable, "-c", ECHO, "10.81.0.1"], stdout=subprocess.PIPE)
        assert echo.stdout.readline() == b"bound\n"
        assert a.udp_bound(6969) and a.udp_bound(6969, "10.81.0.1")
        assert not a.udp_bound(6969, "10.81.0.9") and not b.udp_bound(6969)
        r = b.run(sys.executable, "-c", ASK, "10.81.0.1", capture_output=True, text=True,
                  timeout=30)
        assert r.stdout == "b'hello'\n", r.stderr
    host = subprocess.run(["ip", "-o", "addr"], check=False, capture_output=True, text=True).stdout
    assert "10.81.0." not in host


@pytest.mark.netns
def test_a_stale_lab_is_removed_by_a_later_run_from_its_state_file(tmp_path):
    need_root()
    net = LabNet(name("l"), "10.81.1")
    state = tmp_path / "state.json"
    try:
        net.create()
        assert net.exists()
        lan = Namespace(net.lan).ip("-o", "addr")
        assert f"{net.device_ip}/24" in lan and f"{net.controller_ip}/24" in lan
        echo = subprocess.Popen(Namespace(net.router).argv(sys.executable, "-c", ECHO,
                                                           net.router_ip), stdout=subprocess.PIPE)
        assert echo.stdout.readline() == b"bound\n"
        r = Namespace(net.lan).run(sys.executable, "-c", ASK, net.router_ip,
                                   capture_output=True, text=True, timeout=30)
        assert r.stdout == "b'hello'\n", r.stderr  # the LAN reaches its router
        assert echo.wait(timeout=10) == 0
        run = Supervisor(state)
        proc = run.start("router", SLEEPER, netns=net.router, log=tmp_path / "router.log")
        stray = subprocess.Popen(Namespace(net.lan).argv(*SLEEPER), start_new_session=True)
        assert inside(net.lan, {stray.pid})
        # The run ends without stopping anything (as if killed); the next reads its state file.
        removed = netns.teardown(net, Supervisor.load(state))
        assert removed[0] == f"process router ({proc.pid})"
        assert f"process {stray.pid} in {net.lan}" in removed
        assert removed[-1] == f"namespace {net.router}" and f"namespace {net.lan}" in removed
        assert not net.exists()
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert stray.wait(timeout=10) == -signal.SIGTERM
        assert netns.teardown(net, Supervisor.load(state)) == []
    finally:
        netns.teardown(net)


def test_without_a_namespace_nothing_is_removed():
    assert netns.remove_namespace(f"ebns-none-{os.getpid()}") == []


def test_the_state_file_is_written_atomically_at_each_change(tmp_path):
    state = tmp_path / "lab" / "state.json"
    sup = Supervisor(state)
    proc = sup.start("s", SLEEPER, log=tmp_path / "logs" / "s.log")
    assert json.loads(state.read_text())["pids"] == {"s": proc.pid}
    assert Path(tmp_path / "logs" / "s.log").exists()
    sup.stop("s")
    assert json.loads(state.read_text()) == {"pids": {}, "cmds": {}, "starts": {}}
    assert sorted(p.name for p in state.parent.iterdir()) == ["state.json"]
