"""GET /api/v1/plan loads the site files outside the operator's lock, and only for a caller
with the token: the load validates the whole site and renders every machine's Ignition, and
under the lock that passes, the view and the power commands take, a few clients asking for
plans in a loop, with no token, slowed them all."""

from __future__ import annotations

import threading

from bastion_testkit import auth


def test_the_operator_answers_while_a_plan_loads_the_site_files(site_dir, client_for):
    c = client_for(site_dir)
    holder = c.app.state.runtime.holder
    loading, go_on = threading.Event(), threading.Event()
    load = holder.load

    def slow_load(*a, **kw):
        loading.set()
        go_on.wait(60)
        return load(*a, **kw)

    holder.load = slow_load
    planned, viewed = [], []
    planner = threading.Thread(target=lambda: planned.append(c.get("/api/v1/plan", headers=auth())))
    planner.start()
    try:
        assert loading.wait(30), "the plan never loaded the files"
        viewer = threading.Thread(target=lambda: viewed.append(c.get("/api/v1/operator")))
        viewer.start()
        viewer.join(20)  # a guard against a hang, not a timing: the load waits until go_on
        assert viewed and viewed[0].status_code == 200, "GET /api/v1/operator waited for the plan's load"
        assert not planned  # the plan still loads
    finally:
        go_on.set()
        planner.join(30)
    assert planned[0].status_code == 200 and set(planned[0].json()) >= {"id", "changes", "actions"}


def test_a_plan_needs_the_token_and_without_it_loads_nothing(site_dir, client_for):
    c = client_for(site_dir)
    holder = c.app.state.runtime.holder
    loads = []
    load = holder.load
    holder.load = lambda *a, **kw: loads.append(1) or load(*a, **kw)
    assert c.get("/api/v1/plan").status_code == 401
    assert c.get("/api/v1/plan", headers=auth("not-the-token-0123456789")).status_code == 401
    assert loads == []
    r = c.get("/api/v1/plan", headers=auth())
    assert r.status_code == 200 and loads == [1]
    # the reads around it stay open
    assert c.get("/api/v1/operator").status_code == 200
