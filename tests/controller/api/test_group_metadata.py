"""What `GET /api/v1/groups/{gid}/metadata` says of itself is true: it needs the token, but the
public `GET /metadata` answers the same values to any host that sends the group's selector
(which `GET /api/v1/groups` shows), so the route must not say the token keeps secrets there."""

from __future__ import annotations

from bastion_testkit import auth


def test_the_group_metadata_route_does_not_promise_what_metadata_gives_away(client_for, site_dir):
    c = client_for(site_dir)
    r = c.put("/api/v1/groups/rescue", headers=auth(), json={
        "profile": "flatcar-worker", "selector": {"mode": "rescue"},
        "metadata": {"motd": "rescue shell", "root_password": "hunter2"}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert c.get("/api/v1/groups/rescue/metadata").status_code == 401
    guarded = c.get("/api/v1/groups/rescue/metadata", headers=auth()).json()
    assert guarded == {"motd": "rescue shell", "root_password": "hunter2"}
    # anyone: the selector from the open list, then the values from the open boot endpoint
    selector = next(g["selector"] for g in c.get("/api/v1/groups").json() if g["id"] == "rescue")
    public = c.get("/metadata", params=selector)
    assert public.status_code == 200
    assert {"MOTD=rescue shell", "ROOT_PASSWORD=hunter2"} <= set(public.text.splitlines())
    # so the route's own words (its OpenAPI summary, what Swagger UI shows) say so
    operation = c.get("/openapi.json").json()["paths"]["/api/v1/groups/{gid}/metadata"]["get"]
    assert "may hold secrets" not in operation["summary"]
    assert "not secret" in operation["summary"] and "/metadata" in operation["summary"]
