"""GET /api/v1/events answers a bounded number of bytes, whatever its `limit`, and says where
the rest is: a history filled with large events through the open POST /callback made each
GET ?limit=10000 build 57 MiB of JSON at once."""

from __future__ import annotations

import re
import time

# docs/controller.md: an answer holds about 4 MiB of JSON at most
ANSWER_BYTES = 4 * 2**20


def _next(r) -> str | None:
    m = re.fullmatch(r'<([^>]+)>; rel="next"', r.headers.get("link", ""))
    return m.group(1) if m else None


def _fill_with_large_events(c, count: int) -> list[int]:
    """One real callback with as much as a LAN host may send, then `count` more like it."""
    body = "&".join(f"f{i}=" + "x" * 2600 for i in range(24))
    r = c.post("/callback", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code < 300, r.text
    stored = c.get("/api/v1/events", params={"kind": "callback", "limit": 1}).json()[0]["payload"]
    rt = c.app.state.runtime
    event = {"source": "node", "endpoint": "/callback", "payload": stored, "ts": time.time()}
    return rt.commit_events([("callback", dict(event)) for _ in range(count)])


def test_a_history_of_large_events_is_answered_in_bounded_pages_that_reach_every_one(site_dir, client_for):
    c = client_for(site_dir, client=("10.77.0.50", 5000))
    ids = _fill_with_large_events(c, 1500)  # about 9 MiB of JSON
    everything = [e.id for e in c.app.state.runtime.store.query(limit=10000)]
    assert set(ids) <= set(everything)

    # newest first, page by page through the Link header
    seen, url, pages = [], "/api/v1/events?limit=10000", 0
    while url is not None:
        r = c.get(url)
        assert r.status_code == 200
        assert len(r.content) <= ANSWER_BYTES, f"{len(r.content)} bytes in one answer"
        page = r.json()
        assert page, url
        seen += [e["id"] for e in page]
        url, pages = _next(r), pages + 1
    assert seen == everything  # each once, newest first
    assert pages >= 3

    # oldest first after an id: the same events, the other way round
    seen, url = [], "/api/v1/events?after=0&limit=10000&kind=callback"
    while url is not None:
        r = c.get(url)
        assert len(r.content) <= ANSWER_BYTES
        seen += [e["id"] for e in r.json()]
        url = _next(r)
    store = c.app.state.runtime.store
    assert seen == [e.id for e in reversed(store.query(kind="callback", limit=10000))]
    assert len(seen) == len(ids) + 1  # the real callback and its copies


def test_small_answers_are_as_before_and_a_full_one_says_more_may_follow(site_dir, client_for):
    c = client_for(site_dir)
    rt = c.app.state.runtime
    kinds = ["boot"] * 9 + ["site"]  # a rare kind among many: the reads from the top widen
    rt.commit_events([(kinds[i % 10], {"source": "controller", "payload": {"n": i}, "ts": time.time()})
                      for i in range(3000)])  # fmt: skip
    store = rt.store
    for params in ({}, {"limit": 1}, {"limit": 450}, {"kind": "site", "limit": 10000},
                   {"kind": "site", "limit": 120}, {"kind": "boot", "limit": 2000}):  # fmt: skip
        r = c.get("/api/v1/events", params=params)
        want = [e.as_dict() for e in store.query(**params)]
        assert r.json() == want, params
        assert (_next(r) is not None) == (len(want) == params.get("limit", 100)), params
    # before= pages on, newest first; after= with before= is a range, oldest first
    newest = store.newest_id()
    r = c.get("/api/v1/events", params={"before": newest - 10, "limit": 5, "kind": "site"})
    assert [e["id"] for e in r.json()] == [e.id for e in store.query(kind="site", limit=10000)
                                           if e.id < newest - 10][:5]  # fmt: skip
    r = c.get("/api/v1/events", params={"after": 100, "before": 131, "limit": 10000})
    assert [e["id"] for e in r.json()] == list(range(101, 131))
    assert _next(r) is None
    assert c.get("/api/v1/events", params={"limit": 0}).json() == []
