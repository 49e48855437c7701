"""/assets/: Starlette's Range, ETag and HEAD handling as the controller serves it, and paths that
try to leave assets/, through TestClient and with curl (--path-as-is) against a real server."""

from __future__ import annotations

import os
import re
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from urllib.parse import unquote_to_bytes

import anyio
import pytest
from bastion_testkit import curl, metric

KERNEL = "flatcar/amd64/flatcar_production_pxe.vmlinuz"
URL = f"/assets/{KERNEL}"
SECRET = b"not-for-nodes: the controller's own file\n"


def data(site: Path) -> bytes:
    return (site / "assets" / KERNEL).read_bytes()


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body (RFC 9110 14.6)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert message.is_multipart()
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()]


# -- Range, ETag, HEAD (TestClient) ---------------------------------------------------------------


def test_whole_file_with_validators(site_dir, client_for):
    c = client_for(site_dir)
    r = c.get(URL)
    assert r.status_code == 200
    assert r.content == data(site_dir)
    assert r.headers["content-length"] == str(len(data(site_dir)))
    assert r.headers["accept-ranges"] == "bytes"
    assert re.fullmatch(r'"[0-9a-f]+"', r.headers["etag"])
    assert r.headers["last-modified"].endswith(" GMT")
    event = c.get("/api/v1/events", params={"kind": "asset", "limit": 1}).json()[0]
    assert (event["endpoint"], event["status"], event["payload"]["size"]) == (
        URL,
        200,
        len(data(site_dir)),
    )


@pytest.mark.parametrize(
    "spec, first, last",
    [("bytes=0-9", 0, 9), ("bytes=100-199", 100, 199), ("bytes=-10", -10, None), ("bytes=299990-", 299990, None),
     ("bytes=299990-400000", 299990, None)],
    ids=["first-ten", "middle", "suffix", "open-ended", "past-the-end"],
)  # fmt: skip
def test_a_single_range_is_206_with_those_bytes(spec, first, last, site_dir, client_for):
    whole = data(site_dir)
    size = len(whole)
    start = first % size
    end = last if last is not None else size - 1
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": spec})
    assert r.status_code == 206
    assert r.content == whole[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
    assert r.headers["content-length"] == str(end + 1 - start)
    assert (
        c.get("/api/v1/events", params={"kind": "asset", "limit": 1}).json()[0]["payload"]["range"]
        == spec
    )


def test_several_ranges_are_one_multipart_byteranges_answer(site_dir, client_for):
    whole = data(site_dir)
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": "bytes=0-9, 1000-1099, -5"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(r.headers["content-length"]) == len(r.content)
    size = len(whole)
    assert multipart_parts(r.headers["content-type"], r.content) == [
        (f"bytes 0-9/{size}", whole[0:10]),
        (f"bytes 1000-1099/{size}", whole[1000:1100]),
        (f"bytes {size - 5}-{size - 1}/{size}", whole[-5:]),
    ]


@pytest.mark.parametrize("spec", ["bytes=300000-", "bytes=999999999-999999999"])
def test_an_unsatisfiable_range_is_416(spec, site_dir, client_for):
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": spec})
    # RFC 9110 15.5.17: 416 with Content-Range: bytes */<length>
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(data(site_dir))}"
    assert r.content == b""


@pytest.mark.parametrize(
    "spec, message",
    [("bytes=9-0", "start must be less than end"), ("bytes=abc", "range must be requested")],
)  # fmt: skip
def test_a_malformed_range_is_400_as_starlette_answers_it(spec, message, site_dir, client_for):
    # Starlette refuses these with 400, which RFC 9110 14.2 allows for an invalid range
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": spec})
    assert r.status_code == 400
    assert message in r.text


def test_a_range_unit_it_does_not_know_is_ignored_and_the_whole_file_sent(site_dir, client_for):
    # RFC 9110 14.2: a server MUST ignore a Range with a unit it does not understand (Starlette
    # answered 400 "Only support bytes range")
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": "items=0-9"})
    assert (r.status_code, r.content) == (200, data(site_dir))


def test_ranges_of_which_one_can_be_served_are_a_206_with_that_one(site_dir, client_for):
    # RFC 9110 15.5.17: 416 only when none of the ranges overlaps the file (Starlette: when one
    # did not)
    whole = data(site_dir)
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": f"bytes=0-1,{len(whole) + 10}-"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 0-1/{len(whole)}" and r.content == whole[:2]


def test_the_status_recorded_is_the_one_sent(site_dir, client_for):
    # The history and the metric took the status before Starlette judged the Range: a 416 was
    # recorded as 200, a kernel fetched for the operator, where a node had failed to fetch it
    c = client_for(site_dir)
    size = len(data(site_dir))
    sent = []
    for spec in ("bytes=0-9", f"bytes={size}-", "bytes=9-0", None):
        r = c.get(URL, headers={"Range": spec} if spec else {})
        sent.append(r.status_code)
    assert sent == [206, 416, 400, 200]
    events = c.get("/api/v1/events", params={"kind": "asset", "limit": 4}).json()
    assert [e["status"] for e in reversed(events)] == sent
    for status in (206, 416, 400, 200):
        assert metric(c, "bastion_asset_requests_total", status=str(status)) == 1, status


def test_overlapping_ranges_are_merged_into_one(site_dir, client_for):
    c = client_for(site_dir)
    r = c.get(URL, headers={"Range": "bytes=0-9,5-15"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 0-15/{len(data(site_dir))}"
    assert r.content == data(site_dir)[:16]


def test_etag_and_if_none_match_give_304(site_dir, client_for):
    c = client_for(site_dir)
    first = c.get(URL)
    etag = first.headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = c.get(URL, headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == etag
    r = c.get(URL, headers={"If-None-Match": '"something-else"'})
    assert (r.status_code, r.content) == (200, data(site_dir))
    r = c.get(URL, headers={"If-Modified-Since": first.headers["last-modified"]})
    assert r.status_code == 304


def test_if_range_gives_the_range_only_for_the_same_file(site_dir, client_for):
    c = client_for(site_dir)
    etag = c.get(URL).headers["etag"]
    r = c.get(URL, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (r.status_code, r.content) == (206, data(site_dir)[:10])
    r = c.get(URL, headers={"Range": "bytes=0-9", "If-Range": '"an-older-file"'})
    assert (r.status_code, r.content) == (200, data(site_dir))


def test_a_changed_file_gets_a_new_etag(site_dir, client_for):
    c = client_for(site_dir)
    old = c.get(URL).headers["etag"]
    path = site_dir / "assets" / KERNEL
    path.write_bytes(b"a newer kernel")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = c.get(URL, headers={"If-None-Match": old})
    assert (r.status_code, r.content) == (200, b"a newer kernel")
    assert r.headers["etag"] != old


@pytest.mark.parametrize("spec", [None, "bytes=100-", "bytes=0-9,200-299"],
                         ids=["whole", "range", "ranges"])  # fmt: skip
def test_a_file_replaced_while_it_is_served_is_one_file_or_the_other(
    spec, site_dir, client_for, monkeypatch
):
    # The file was looked at (size, ETag, Content-Range) and opened again to be sent: replaced
    # in between (an admin's `mv`, a fetch repairing an object), a node got the headers of the
    # old file and the bytes of the new one, or, resuming with If-Range, half of each.
    from starlette.staticfiles import StaticFiles

    path = site_dir / "assets" / KERNEL
    old, new = data(site_dir), os.urandom(250_000)
    lookup = StaticFiles.lookup_path

    def looked_up_then_replaced(self, rel):
        found = lookup(self, rel)
        if path.read_bytes() == old:  # once: the new kernel moves in (a rename, as mv does)
            (path.parent / "new").write_bytes(new)
            os.replace(path.parent / "new", path)
        return found

    c = client_for(site_dir)
    etag_of_old = c.get(URL).headers["etag"]
    monkeypatch.setattr(StaticFiles, "lookup_path", looked_up_then_replaced)
    headers = {"Range": spec, "If-Range": etag_of_old} if spec else {}
    r = c.get(URL, headers=headers)
    monkeypatch.undo()
    etag_of_new = c.get(URL).headers["etag"]
    # One file, whole and with its own headers: the new one (the old one's If-Range no longer holds).
    assert r.status_code == 200
    assert r.content == new
    assert r.headers["content-length"] == str(len(new))
    assert r.headers["etag"] == etag_of_new != etag_of_old


def test_head_has_the_headers_of_get_and_no_body(site_dir, client_for):
    c = client_for(site_dir)
    get = c.get(URL)
    head = c.head(URL)
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "etag", "last-modified", "accept-ranges", "content-type"):
        assert head.headers[name] == get.headers[name], name
    assert c.head("/assets/nope").status_code == 404
    assert c.head(f"{URL}", headers={"If-None-Match": get.headers["etag"]}).status_code == 304


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_a_method_it_does_not_serve_is_405_allowing_get_and_head(method, site_dir, client_for):
    # RFC 9110 15.5.6: Allow lists what the resource supports; it said HEAD only, the method of
    # the first of the two routes (one per method, for OpenAPI's operation ids)
    c = client_for(site_dir)
    r = c.request(method, URL)
    assert r.status_code == 405
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "HEAD"]
    assert c.get(URL).content == data(site_dir)
    assert c.head(URL).headers["content-length"] == str(len(data(site_dir)))


# -- paths that leave assets/ ---------------------------------------------------------------------

# (raw request path, status): refused before the disk (400) or not found inside assets/ (404).
ESCAPES = [
    ("/assets/../site.yaml", 400),
    ("/assets/flatcar/../../site.yaml", 400),
    ("/assets/%2e%2e/site.yaml", 400),
    ("/assets/%2E%2E/%2E%2E/secret.txt", 400),
    ("/assets/..%2fsite.yaml", 400),
    ("/assets/flatcar/%2e%2e%2f%2e%2e%2fsite.yaml", 400),
    ("/assets//etc/passwd", 400),
    ("/assets/%2fetc%2fpasswd", 400),
    ("/assets/..%5csite.yaml", 400),
    ("/assets/a%00b", 400),
    ("/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz%00.txt", 400),
    ("/assets/outside-file", 404),  # a symlink to a file outside assets/
    ("/assets/outside-dir/secret.txt", 404),  # through a symlinked directory outside
    ("/assets/up/site.yaml", 404),  # a relative symlink ../ out of assets/
    ("/assets/" + "a" * 300, 404),  # a name longer than the file system allows
    ("/assets/flatcar", 404),  # a directory is not a file
    ("/assets/", 400),  # no file named: nothing to list either
]


@pytest.fixture
def escapes_site(site_dir: Path) -> Path:
    outside = site_dir.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    assets = site_dir / "assets"
    (assets / "outside-file").symlink_to(outside / "secret.txt")
    (assets / "outside-dir").symlink_to(outside, target_is_directory=True)
    (assets / "up").symlink_to("..", target_is_directory=True)
    (assets / "inside").symlink_to("flatcar/amd64/flatcar_production_pxe.vmlinuz")
    (site_dir / "secret.txt").write_bytes(SECRET)
    return site_dir


def asgi_get(app, raw_path: bytes) -> tuple[int, bytes]:
    """GET with this exact request target: httpx (under TestClient) removes dot segments first."""

    async def run() -> tuple[int, bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
            "raw_path": raw_path, "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }  # fmt: skip
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, body

    return anyio.run(run)


@pytest.mark.parametrize("path, status", ESCAPES, ids=[p for p, _ in ESCAPES])
def test_paths_out_of_assets_are_refused(path, status, escapes_site, client_for):
    c = client_for(escapes_site)
    got, body = asgi_get(c.app, path.encode())
    assert got == status, body
    assert SECRET not in body and b"site: home-lab" not in body
    assert c.get("/api/v1/events", params={"kind": "asset"}).json() == []  # refusals are not boots
    assert metric(c, "bastion_asset_requests_total", status=str(status)) == 1


def test_a_symlink_inside_assets_to_a_file_inside_is_served(escapes_site, client_for):
    c = client_for(escapes_site)
    r = c.get("/assets/inside")
    assert (r.status_code, r.content) == (200, data(escapes_site))


@pytest.fixture
def real_server(escapes_site, serve):
    return serve(escapes_site)


@pytest.mark.parametrize("path, status", ESCAPES, ids=[p for p, _ in ESCAPES])
def test_paths_out_of_assets_are_refused_by_a_real_server(path, status, real_server, tmp_path):
    out = tmp_path / "body"
    r = curl(
        "--path-as-is", "--globoff", "-o", str(out), "-w", "%{http_code}", real_server.url + path
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == status
    assert SECRET not in out.read_bytes()


def test_ranges_etag_and_head_with_curl(real_server, escapes_site, tmp_path):
    whole = data(escapes_site)
    url = real_server.url + URL
    out = tmp_path / "out"

    r = curl("--fail", "-o", str(out), url)
    assert r.returncode == 0 and out.read_bytes() == whole

    r = curl("--fail", "-r", "100-199", "-o", str(out), "-w", "%{http_code}", url)
    assert (r.stdout, out.read_bytes()) == (b"206", whole[100:200])

    r = curl("-r", "0-9,-5", "-D", "-", "-o", str(out), url)
    headers = r.stdout.decode()
    assert headers.startswith("HTTP/1.1 206")
    content_type = re.search(r"(?im)^content-type: (.+?)\r$", headers).group(1)
    size = len(whole)
    assert multipart_parts(content_type, out.read_bytes()) == [
        (f"bytes 0-9/{size}", whole[:10]),
        (f"bytes {size - 5}-{size - 1}/{size}", whole[-5:]),
    ]

    r = curl("-r", f"{size}-", "-o", "/dev/null", "-w", "%{http_code}", url)
    assert r.stdout == b"416"

    head = curl("--fail", "-I", url).stdout.decode()
    assert re.search(rf"(?im)^content-length: {size}\r$", head)
    etag = re.search(r"(?im)^etag: (.+?)\r$", head).group(1)
    r = curl(
        "-H",
        f"If-None-Match: {etag}",
        "-o",
        str(tmp_path / "none"),
        "-w",
        "%{http_code} %{size_download}",
        url,
    )
    assert r.stdout == b"304 0"

    # a download that resumes where it broke off (curl -C -) gets the rest, byte for byte
    out.write_bytes(whole[:12345])
    r = curl("--fail", "-C", "-", "-o", str(out), url)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == whole
