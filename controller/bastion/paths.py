"""Where the controller finds its data and keeps its caches: the same answers in a source
checkout and in an installed package (a wheel, pipx), which has no repository around it.

    board_names(), board_file(name)   the board definitions: package data `bastion.boards`
                                      (the repository's boards/ directory)
    var_dir()                         $BASTION_VAR_DIR; else <checkout>/var in a source checkout;
                                      else $XDG_CACHE_HOME/edge-bastion (~/.cache/edge-bastion)
    cache_dir()                       var_dir()/cache: downloads and builds that can be remade
                                      (tools/build-grub-arm64, the lab's kernels and initrds)
    checkout()                        the source checkout this package runs from, or None
    web_dir()                         $BASTION_WEB_DIR; else <checkout>/web; else var_dir()/web:
                                      the browser parts from npm (web/package.json; `npm ci`)
"""

from __future__ import annotations

import importlib.resources
import os
from importlib.resources.abc import Traversable
from pathlib import Path


def checkout() -> Path | None:
    """The repository this package runs from (an editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "controller" / "bastion").is_dir():
        return root
    return None


def var_dir() -> Path:
    env = os.environ.get("BASTION_VAR_DIR")
    if env:
        return Path(env)
    repo = checkout()
    if repo is not None:
        return repo / "var"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edge-bastion"


def web_dir() -> Path:
    """Where web/package.json's packages are installed (node_modules/ inside it): the
    controller serves xterm.js and Swagger UI from there itself, never from a CDN
    (docs/consoles.md, docs/controller.md)."""
    env = os.environ.get("BASTION_WEB_DIR")
    if env:
        return Path(env)
    repo = checkout()
    return repo / "web" if repo is not None else var_dir() / "web"


def cache_dir() -> Path:
    return var_dir() / "cache"


def _boards() -> Traversable:
    return importlib.resources.files("bastion.boards")


def board_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _boards().iterdir() if p.name.endswith(".json"))


def board_file(name: str) -> Traversable | None:
    """boards/<name>.json as package data, None when there is no such board."""
    if not name or "/" in name or name.startswith("."):
        return None
    f = _boards().joinpath(f"{name}.json")
    return f if f.is_file() else None
