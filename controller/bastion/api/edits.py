"""Writing site files through the API: every edit is validated against the whole site first."""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import HTTPException

from bastion.api.deps import Runtime
from bastion.site.load import SiteError
from bastion.site.model import Site


def current_yaml(runtime: Runtime, rel: str) -> Any:
    path = runtime.holder.root / rel
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HTTPException(409, f"{rel} is not valid YAML now; fix it by hand first: {e}") from None


def apply_or_422(runtime: Runtime, changes: dict[str, bytes | None]) -> Site:
    """Write `changes` if the site with them loads; otherwise 422 listing the problems."""
    try:
        site = runtime.holder.apply(changes)
    except SiteError as e:
        raise HTTPException(422, {"message": "the edit would break the site", "problems": e.problems}) from None
    runtime.record("site", source="api", payload={"edit": sorted(changes), "generation": runtime.holder.generation})
    return site
