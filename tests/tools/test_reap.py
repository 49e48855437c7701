"""tools/reap, which tools/test runs pytest under: whatever the command leaves running is ended
when the command ends, however it ends, and the command's exit status is passed on."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from bastion.lab.netns import pid_running
from benchkit import REPO

REAP = REPO / "tools" / "reap"


def reap(script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REAP), "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, check=False, **kw)  # fmt: skip


def pids(out: str) -> list[int]:
    return [int(w) for w in out.split()]


def test_what_the_command_left_running_is_ended_and_named_and_its_status_passed_on():
    # two sleeps in the background, one of them in a process group of its own (as a test's
    # server started with start_new_session is): both outlive sh, which exits 3
    r = reap("sleep 300 & echo $!; setsid sleep 300 & echo $!; exit 3")
    assert r.returncode == 3, r.stderr
    left = pids(r.stdout)
    assert len(left) == 2, r.stdout
    for pid in left:
        assert not pid_running(pid), f"{pid} still runs"
        # named, with its command line: sh's own while the fork has not yet run sleep, and none
        # to read in the middle of the exec (then its name, or "?" once it is gone)
        assert re.search(rf"^reap: {pid} was left running \(.*\): SIGTERM$", r.stderr, re.M), r.stderr


def test_a_command_killed_outright_still_has_its_leftovers_ended():
    # what a CI runner's SIGKILL does to pytest: no teardown runs
    r = reap("sleep 300 & echo $!; kill -9 $$")
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    (pid,) = pids(r.stdout)
    assert not pid_running(pid)


def test_a_leftover_that_ignores_sigterm_gets_sigkill():
    r = reap("trap '' TERM; sleep 300 & echo $!; exit 0")
    # the sleep inherits the ignored SIGTERM (a disposition set to ignore survives exec)
    assert r.returncode == 0, r.stderr
    (pid,) = pids(r.stdout)
    assert not pid_running(pid)
    assert f"reap: {pid} was left running" in r.stderr, r.stderr


def test_sigterm_is_passed_on_to_the_command():
    p = subprocess.Popen([sys.executable, str(REAP), "sh", "-c", "trap 'exit 7' TERM; echo up; "
                          "while :; do sleep 0.05; done"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "up"  # the trap is set; reap's handler was before
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 7
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_an_orphan_that_ends_while_the_command_runs_is_reaped_at_once():
    # a daemon's way: the inner sh starts a sleep and exits, so the sleep is handed to reap; when
    # it ends, reap reaps it, as init would, rather than leaving a zombie (a PID still in /proc)
    # until the command is over
    r = reap('pid=$(sh -c "sleep 0.3 >/dev/null & echo \\$!"); echo $pid; i=0; '
             'while [ -e /proc/$pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
             '[ -e /proc/$pid ] && echo zombie || echo gone')  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == ["gone"], r.stdout


def test_a_command_that_leaves_nothing_is_quiet():
    r = reap("exit 0")
    assert r.returncode == 0 and r.stderr == "", r.stderr
