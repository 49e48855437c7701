"""The UPS policy and the k3s nodes' graceful node shutdown, together (docs/ups.md): a node told
to shut down keeps beating while the kubelet stops its pods, and the policy must not take it for
down, nor give up on it, before its beats stop. The heartbeat interval follows ups.quiet_s, and
a site whose ups.shutdown_wait_s is too short for its nodes' grace period is refused by file and
field. The nodes are examples/home-lab's, as the site loads them; the policy is
bastion.ups.core.decide, driven with made-up times (no time passes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bastion.site.load import SiteError, load_site
from bastion.state.secrets import SecretStore
from bastion.ups import core
from bastion_testkit import REPO
from mirrorkit import home_lab_copy, render_all

VERSION = "v1.31.4+k3s1"


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("home-lab") / "home-lab"
    home_lab_copy(site, VERSION)
    return site


def with_ups(fetched: Path, root: Path, ups: str = "", cluster_lines: str = "") -> Path:
    site = root / "site"
    shutil.copytree(fetched, site)
    text = (site / "site.yaml").read_text().replace("cluster:\n  name: home\n", f"cluster:\n  name: home\n{cluster_lines}")
    (site / "site.yaml").write_text(text + f"\nups:\n  name: eaton\n{ups}")
    return site


def timer_every(config: dict) -> str:
    (timer,) = [u for u in config["systemd"]["units"] if u["name"] == "bastion-heartbeat.timer"]
    (line,) = [x for x in timer["contents"].splitlines() if x.startswith("OnUnitActiveSec=")]
    return line.removeprefix("OnUnitActiveSec=")


@pytest.mark.parametrize("ups, every", [("", "5s"), ("  quiet_s: 60\n  shutdown_wait_s: 135\n", "20s"), ("  quiet_s: 300\n  shutdown_wait_s: 600\n", "30s")])
def test_the_nodes_beat_three_times_within_quiet_s(fetched, tmp_path, ups, every):
    """ups.quiet_s 15 (the default) with the 30 s beats of a node without heartbeat: took a
    running node for down 15 s after each beat."""
    configs = render_all(with_ups(fetched, tmp_path, ups), SecretStore(tmp_path / "secrets"))
    assert {name: timer_every(c) for name, c in configs.items()} == dict.fromkeys(configs, every)


class BeatingNode:
    """A k3s node as the policy sees it: it beats every `every` s from `phase`; the first beat
    after it is asked carries the request, and it goes on beating for `delay` s more (the
    kubelet holding the shutdown while the pods stop), then falls silent."""

    def __init__(self, name, relay, server, every, delay, phase):
        self.name, self.relay, self.server = name, relay, server
        self.every, self.delay, self.phase = every, delay, phase
        self.asked_at = self.told_at = None
        self.beat_at = None

    def at(self, now) -> core.Node:
        beats = [self.phase + k * self.every for k in range(int((now - self.phase) // self.every) + 1)]
        if self.asked_at is not None and self.told_at is None:
            after = [b for b in beats if b >= self.asked_at]
            self.told_at = after[0] if after else None
        if self.told_at is not None:
            beats = [b for b in beats if b <= self.told_at + self.delay]
        self.beat_at = beats[-1] if beats else None
        return core.Node(self.name, self.relay, self.server, self.beat_at, "on")


@pytest.mark.parametrize("phase", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("grace", ["", "  shutdown_grace_s: 120\n  shutdown_critical_s: 30\n"])
def test_a_node_stopping_its_pods_is_neither_taken_for_down_nor_cut_short(fetched, tmp_path, phase, grace):
    ups = "  shutdown_wait_s: 300\n" if grace else ""
    site = load_site(with_ups(fetched, tmp_path, ups, grace))
    p = core.Policy.of(site.settings.ups)
    poll = site.settings.ups.poll_s
    nodes = [BeatingNode(m.name, m.relay, m.node["server"], m.node["heartbeat"]["every_s"],
                         m.node["shutdown"]["inhibit_delay_s"], phase) for m in site.cluster_nodes]  # fmt: skip
    mem, seen = None, []
    for now in range(0, 1200, poll):
        acts, mem = core.decide(core.Ups(("OB", "DISCHRG"), 90), None, [n.at(now) for n in nodes], mem, now, p)
        for a in acts:
            n = next((n for n in nodes if n.name == a.machine), None)
            if a.action == "shutdown":
                n.asked_at = now
            seen.append((now, a.action, a.machine))
        if mem.phase == "off":
            break
    assert not [s for s in seen if s[1] == "timeout"], seen
    assert mem.phase == "off" and set(mem.opened) == {n.name for n in nodes}
    for n in nodes:
        assert n.told_at is not None, f"{n.name} was never told: taken for down while it ran, {seen}"
        stopped = n.told_at + n.delay - (n.told_at + n.delay - n.phase) % n.every  # its last beat
        (down,) = [t for t, action, machine in seen if action == "down" and machine == n.name]
        (opened,) = [t for t, action, machine in seen if action == "open" and machine == n.name]
        # down only once it has been silent for quiet_s, after the kubelet let the shutdown go
        assert down >= stopped + p.quiet_s and down >= n.told_at + n.delay, (n.name, seen)
        assert opened >= down


def problems(site: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site)
    return e.value.problems


@pytest.mark.parametrize("ups, cluster_lines, problem", [
    ("  shutdown_wait_s: 60\n", "",
     ("site.yaml: ups.shutdown_wait_s: 60 s is shorter than machine pi1 may take to shut down cleanly, "
     "75 s: up to 5 s until its heartbeat carries the request, 50 s of graceful node shutdown "
     "(cluster.shutdown_grace_s and 5 s for the kubelet to finish), quiet_s (15 s) of silence and a "
     "poll (poll_s, 5 s); its relay would open while it still stops. Make it at least 75, or shorten "
     "cluster.shutdown_grace_s")),
    ("", "  shutdown_grace_s: 300\n",
     "site.yaml: ups.shutdown_wait_s: 120 s is shorter than machine pi1 may take to shut down cleanly, 330 s"),
    ("  shutdown_wait_s: 20\n", "  shutdown_grace_s: 0\n",
     ("site.yaml: ups.shutdown_wait_s: 20 s is shorter than machine pi1 may take to shut down cleanly, "
     "25 s: up to 5 s until its heartbeat carries the request, quiet_s (15 s) of silence and a poll "
     "(poll_s, 5 s); its relay would open while it still stops. Make it at least 25")),
    ("  quiet_s: 3\n", "",
     ("site.yaml: ups.quiet_s: 3 s is less than two of machine pi1's heartbeats (every 2 s): a node "
     "still running would be taken for down and its relay opened; make it at least 4")),
])  # fmt: skip
def test_a_shutdown_wait_that_would_cut_a_node_short_is_refused(fetched, tmp_path, ups, cluster_lines, problem):
    found = problems(with_ups(fetched, tmp_path, ups, cluster_lines))
    assert [p for p in found if p.startswith(problem)] == found, found


@pytest.mark.parametrize("ups, cluster_lines", [
    ("", ""),  # the defaults fit
    ("  shutdown_wait_s: 75\n", ""),  # exactly
    ("  shutdown_wait_s: 25\n", "  shutdown_grace_s: 0\n"),
])  # fmt: skip
def test_a_shutdown_wait_that_fits_loads(fetched, tmp_path, ups, cluster_lines):
    assert load_site(with_ups(fetched, tmp_path, ups, cluster_lines)).settings.ups is not None


def test_shutdown_takes_the_beat_the_delay_the_silence_and_a_poll():
    assert core.shutdown_takes_s(5, 50, 15, 5) == 75
    assert core.shutdown_takes_s(30, 0, 15, 5) == 50


def test_docs_ups_md_shows_the_error_the_site_gives(fetched, tmp_path):
    """docs/ups.md's example of a shutdown_wait_s too short is what loading the home lab with it
    says, word for word."""
    doc = (REPO / "docs" / "ups.md").read_text()
    section = doc[doc.index("**How long a k3s node takes.**"):]
    shown = section[section.index("```text\n") + len("```text\n"):section.index("\n```", section.index("```text"))]
    assert problems(with_ups(fetched, tmp_path, "  shutdown_wait_s: 60\n")) == [shown]
