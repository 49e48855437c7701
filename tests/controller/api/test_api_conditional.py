"""If-None-Match on the site entries (RFC 9110 13.1.2): GET of one machine, profile or group
answers 304 with its ETag and no body while the client's copy is current (weak comparison, a
list of tags, `*`), and PUT with `If-None-Match: *` only creates: 412 and nothing written when
the entry exists, judged under the edit's lock from the files on disk."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from bastion_testkit import auth

MACHINE = "/api/v1/machines/node1"
SPARE = {"name": "Spare", "boot": {"kernel": "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz",
                                   "initrd": ["/assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz"]}}  # fmt: skip


@pytest.fixture
def c(client_for, site_dir):
    return client_for(site_dir)


def test_get_with_a_current_tag_is_304_without_a_body(c):
    r = c.put("/api/v1/groups/spare", json={"profile": "flatcar-worker"}, headers=auth())
    assert r.status_code == 200, r.text
    for path in (MACHINE, "/api/v1/profiles/flatcar-worker", "/api/v1/groups/spare"):
        tag = c.get(path).headers["etag"]
        for header in (tag, f"W/{tag}", f'"0000", {tag}', f'"0000",W/{tag} ', "*"):
            r = c.get(path, headers={"If-None-Match": header})
            assert r.status_code == 304, (path, header, r.status_code)
            assert r.headers["etag"] == tag and r.content == b""
        # another tag, or a value that is no list of tags: the whole answer
        for header in ('"0000"', f"{tag[1:-1]}"):
            r = c.get(path, headers={"If-None-Match": header})
            assert r.status_code == 200 and r.headers["etag"] == tag and r.json(), (path, header)


def test_a_changed_entry_answers_200_with_its_new_tag(c):
    old = c.get(MACHINE).headers["etag"]
    assert c.patch(MACHINE, json={"hostname": "n1.lan"}, headers=auth()).status_code == 200
    r = c.get(MACHINE, headers={"If-None-Match": old})
    assert r.status_code == 200 and r.headers["etag"] != old, r.text
    assert r.json()["hostname"] == "n1.lan"
    assert c.get("/api/v1/machines/node9", headers={"If-None-Match": "*"}).status_code == 404


def test_put_with_if_none_match_star_creates_only(c, site_dir):
    yaml = site_dir / "machines.yaml"
    before = yaml.read_bytes()
    create_only = {**auth(), "If-None-Match": "*"}
    r = c.put(MACHINE, json={"mac": "52:54:00:12:34:01", "role": "worker", "hostname": "other"},
              headers=create_only)  # fmt: skip
    assert r.status_code == 412, r.text
    tag = c.get(MACHINE).headers["etag"]
    assert r.headers["etag"] == tag
    assert r.json()["detail"] == (f"machine 'node1' exists already: its ETag is {tag} "
                                  "(If-None-Match: * creates only); nothing was written")  # fmt: skip
    assert yaml.read_bytes() == before
    r = c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:09", "role": "worker"},
              headers=create_only)  # fmt: skip
    assert r.status_code == 200, r.text
    assert "node9" in yaml.read_text()
    # profiles and groups alike
    assert c.put("/api/v1/profiles/spare", json=SPARE, headers=create_only).status_code == 200
    held = (site_dir / "profiles" / "spare.json").read_bytes()
    r = c.put("/api/v1/profiles/spare", json={**SPARE, "name": "Other"}, headers=create_only)
    assert r.status_code == 412 and (site_dir / "profiles" / "spare.json").read_bytes() == held, (
        r.text
    )
    r = c.put(
        "/api/v1/profiles/flatcar-worker", json=SPARE, headers=create_only
    )  # its .yaml exists
    assert r.status_code == 412 and not (site_dir / "profiles" / "flatcar-worker.json").exists(), (
        r.text
    )
    assert (
        c.put(
            "/api/v1/groups/spare", json={"profile": "flatcar-worker"}, headers=create_only
        ).status_code
        == 200
    )
    r = c.put("/api/v1/groups/spare", json={"profile": "flatcar-control"}, headers=create_only)
    assert (
        r.status_code == 412 and c.get("/api/v1/groups/spare").json()["profile"] == "flatcar-worker"
    )


def test_put_with_a_tag_in_if_none_match(c):
    tag = c.get(MACHINE).headers["etag"]
    body = {"mac": "52:54:00:12:34:01", "role": "worker", "hostname": "n1.lan"}
    r = c.put(MACHINE, json=body, headers={**auth(), "If-None-Match": f"W/{tag}"})
    assert r.status_code == 412 and r.headers["etag"] == tag, r.text
    r = c.put(MACHINE, json=body, headers={**auth(), "If-None-Match": "nope"})
    assert r.status_code == 400 and r.json()["detail"].startswith(
        "If-None-Match: 'nope' is not *"
    ), r.text
    r = c.put(MACHINE, json=body, headers={**auth(), "If-None-Match": '"0000"'})
    assert r.status_code == 200 and r.json()["hostname"] == "n1.lan", r.text


def test_a_machine_added_by_hand_and_not_yet_loaded_is_not_replaced(c, site_dir):
    # the poll has not loaded it: the site served has no node9, the file does
    yaml = site_dir / "machines.yaml"
    yaml.write_text(
        yaml.read_text() + "  - name: node9\n    mac: 52:54:00:12:34:09\n    role: worker\n"
    )
    hand = yaml.read_bytes()
    assert c.get("/api/v1/machines/node9").status_code == 404
    r = c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:19", "role": "worker"},
              headers={**auth(), "If-None-Match": "*"})  # fmt: skip
    assert r.status_code == 412, r.text
    assert yaml.read_bytes() == hand


def test_creates_at_once_with_if_none_match_star_one_wins(c, site_dir):
    macs = [f"52:54:00:12:35:{i:02x}" for i in range(8)]
    start = threading.Barrier(len(macs))

    def create(mac: str):
        start.wait()
        return c.put("/api/v1/machines/node9", json={"mac": mac, "role": "worker"},
                     headers={**auth(), "If-None-Match": "*"})  # fmt: skip

    with ThreadPoolExecutor(len(macs)) as pool:
        answers = list(pool.map(create, macs))
    codes = [r.status_code for r in answers]
    assert sorted(codes) == [200] + [412] * (len(macs) - 1), [r.text for r in answers]
    winner = macs[codes.index(200)]
    assert c.get("/api/v1/machines/node9").json()["mac"] == winner
    assert (site_dir / "machines.yaml").read_text().count("name: node9") == 1


def test_the_schema_gives_304_and_if_none_match(c):
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/machines/{name}", "/api/v1/profiles/{pid}", "/api/v1/groups/{gid}"):
        get, put = paths[path]["get"], paths[path]["put"]
        assert "ETag" in get["responses"]["304"]["headers"], path
        assert "content" not in get["responses"]["304"], path
        for op in (get, put):
            assert any(
                p["name"] == "If-None-Match" and p["in"] == "header" for p in op["parameters"]
            ), path
        assert "If-None-Match" in put["responses"]["412"]["description"], path
        assert "If-None-Match" not in paths[path]["delete"]["responses"]["412"]["description"], path


def test_a_real_server_answers_304_and_keeps_the_connection(serve, site_dir):
    import httpx

    server = serve(site_dir)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        tag = client.get(MACHINE).headers["etag"]
        r = client.get(MACHINE, headers={"If-None-Match": tag})
        assert r.status_code == 304 and r.headers["etag"] == tag and r.content == b""
        assert "content-length" not in r.headers or r.headers["content-length"] == "0"
        # the next request on the same connection is read as one: no body was sent after the 304
        r = client.get(MACHINE)
        assert r.status_code == 200 and r.json()["name"] == "node1"
