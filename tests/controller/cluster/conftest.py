"""The cluster tests' shared fixture. test_k3s.py has a `lab` of its own (one copy for the module,
its store explicit), which pytest takes over this one there."""

from __future__ import annotations

from pathlib import Path

import pytest
from mirrorkit import home_lab_copy


@pytest.fixture
def lab(tmp_path, monkeypatch) -> Path:
    """A home-lab copy whose secret store is the default one, under tmp_path/state."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("BASTION_SECRETS_DIR", raising=False)
    site = tmp_path / "home-lab"
    home_lab_copy(site)
    return site
