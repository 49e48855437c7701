"""PUT of a profile removes the other file of its id (`.json` for `?format=bastion`, `.yaml`
and `.yml` for matchbox). Which one that is is read under the edit's lock: chosen before it, a
hand edit that renamed the profile's file in between was left beside the new one, and the
site, with two files for one id, refused the edit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from bastion_testkit import auth

SPARE = {"name": "Spare", "boot": {"kernel": "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz",
                                   "initrd": ["/assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz"]}}  # fmt: skip
SPARE_YAML = """name: Spare by hand
os: flatcar
kernel: /assets/flatcar/amd64/flatcar_production_pxe.vmlinuz
initrd:
  - /assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz
"""


class WaitedLock:
    """The site holder's lock, which says when a thread starts to wait for it: the test holds
    it, and acts once the request is at the lock, without guessing at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self):
        self.waiting.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def test_a_rename_by_hand_just_before_the_edits_lock_is_replaced_too(client_for, site_dir):
    c = client_for(site_dir)
    assert c.put("/api/v1/profiles/spare", json=SPARE, headers=auth()).status_code == 200
    profiles = site_dir / "profiles"
    holder = c.app.state.runtime.holder
    holder._lock = gate = WaitedLock()
    gate.lock.acquire()  # the edit stops at the lock
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(c.put, "/api/v1/profiles/spare", json={**SPARE, "name": "Spare 2"},
                             headers=auth())  # fmt: skip
        assert gate.waiting.wait(30)
        # meanwhile someone turns the profile into Edge Bastion's format by hand
        (profiles / "spare.yaml").write_text(SPARE_YAML)
        (profiles / "spare.json").unlink()
        gate.lock.release()
        r = answer.result(60)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Spare 2" and r.json()["format"] == "matchbox"
    assert sorted(p.name for p in profiles.glob("spare.*")) == ["spare.json"]
    assert c.get("/api/v1/profiles/spare").json()["name"] == "Spare 2"
