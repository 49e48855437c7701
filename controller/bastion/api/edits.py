"""Writing site files through the API: every edit is validated against the whole site first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from fastapi import HTTPException

from bastion import yamlfile
from bastion.api.deps import Runtime
from bastion.model import Site
from bastion.site.load import SiteError


def current_yaml(runtime: Runtime, rel: str) -> Any:
    """The file as plain data, read the way the site loader reads it.

    Not yaml.safe_load: YAML 1.1 reads an unquoted MAC such as 52:54:00:12:34:01 as a base-60
    integer, which written back would break every machine the edit did not touch.
    """
    path = runtime.holder.root / rel
    if not path.exists():
        return None
    try:
        return _plain(yamlfile.load(path.read_bytes(), rel))
    except yamlfile.YamlError as e:
        raise HTTPException(409, f"{rel} is not valid YAML now; fix it by hand first: {e}") from None


def _plain(value: Any) -> Any:
    """yamlfile's LineDict/LineList as dict/list, which yaml.safe_dump can write."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def apply_or_422(runtime: Runtime, changes: dict[str, bytes | None]) -> Site:
    """Write `changes` if the site with them loads; otherwise 422 listing the problems."""
    return edit_or_422(runtime, lambda: changes)


def edit_or_422(runtime: Runtime, make: Callable[[], dict[str, bytes | None]]) -> Site:
    """apply_or_422(make()), make() run under the site's lock (SiteHolder.edit): for an edit
    that reads a file to change part of it."""
    made: dict[str, bytes | None] = {}

    def making() -> dict[str, bytes | None]:
        made.update(make())
        return made

    try:
        site = runtime.holder.edit(making)
    except SiteError as e:
        raise HTTPException(422, {"message": "the edit would break the site", "problems": e.problems}) from None
    except OSError as e:  # a site directory the controller's user may not write, a full disk
        raise HTTPException(500, f"the site's files could not be written in {runtime.holder.root}: "
                            f"{e.strerror or e} (nothing was changed)") from None  # fmt: skip
    runtime.record("site", source="api", payload={"edit": sorted(made), "generation": runtime.holder.generation})
    return site


def edit_yaml_or_422(runtime: Runtime, rel: str, change: Callable[[dict[str, Any]], None]) -> Site:
    """Change part of the YAML mapping in `rel` (change(doc) edits it in place, or raises an
    HTTPException), read and written under the site's lock, so that edits at once all land."""

    def make() -> dict[str, bytes | None]:
        doc = current_yaml(runtime, rel)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise HTTPException(409, f"{rel} is not a mapping now (a {type(doc).__name__}); fix it by hand first")
        change(doc)
        return {rel: yaml.safe_dump(doc, sort_keys=False).encode()}

    return edit_or_422(runtime, make)
