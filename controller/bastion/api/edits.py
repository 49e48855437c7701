"""Writing site files through the API: every edit is validated against the whole site first."""

from __future__ import annotations

from typing import Any

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
    try:
        site = runtime.holder.apply(changes)
    except SiteError as e:
        raise HTTPException(422, {"message": "the edit would break the site", "problems": e.problems}) from None
    runtime.record("site", source="api", payload={"edit": sorted(changes), "generation": runtime.holder.generation})
    return site
