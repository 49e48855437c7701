"""The site files' formats, as pydantic models.

Edge Bastion's own YAML files are strict (an unknown key is an error: it is usually a typo).
matchbox's JSON files are read the way matchbox reads them (unknown keys ignored), but with
their types checked.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bastion.match import Malformed, parse_mac
from bastion.site.model import ARCH_ALIASES, ARCHES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UUID = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what} (letters, digits, '.', '_', '-'; no leading symbol)"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class SiteFile(_Strict):
    """site.yaml"""

    site: str | None = Field(default=None, description="the site's name")
    controller_url: str | None = Field(
        default=None,
        description="how nodes reach the controller, e.g. http://10.77.0.1:8080 "
        "(default: the URL the request came to)",
    )
    default_profile: str | None = Field(
        default=None, description="profile for machines that match nothing else"
    )
    roles: dict[str, str] = Field(default_factory=dict, description="role -> profile id")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="variables for every machine's templates"
    )

    @field_validator("controller_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class MachineEntry(_Strict):
    """One entry of machines.yaml"""

    name: str
    mac: str | None = None
    uuid: str | None = None
    arch: str | None = None
    role: str | None = None
    profile: str | None = None
    hostname: str | None = None
    relay: int | None = Field(
        default=None, ge=0, le=63,
        description="the device's relay channel (0-based) that switches this machine's power",
    )
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "machine name")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return parse_mac(v)
        except Malformed:
            raise ValueError(f"{v!r} is not a MAC address") from None

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is not None and not _UUID.match(v):
            raise ValueError(f"{v!r} is not a UUID")
        return v.lower() if v else v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is None:
            return v
        arch = ARCH_ALIASES.get(v, v)
        if arch not in ARCHES:
            raise ValueError(f"{v!r} is not an architecture ({', '.join(ARCHES)})")
        return arch


class MachinesFile(_Strict):
    """machines.yaml"""

    machines: list[MachineEntry] = Field(default_factory=list)


class BootSpec(_Strict):
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)


class ProfileFile(_Strict):
    """profiles/<id>.yaml (Edge Bastion's own profile format)"""

    id: str | None = None
    name: str | None = None
    os: Literal["flatcar", "custom"] = "flatcar"
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    arch: dict[str, BootSpec] = Field(default_factory=dict)
    ignition: str | None = None
    generic: str | None = None

    @field_validator("arch")
    @classmethod
    def _arches(cls, v: dict[str, BootSpec]) -> dict[str, BootSpec]:
        out = {}
        for key, spec in v.items():
            arch = ARCH_ALIASES.get(key, key)
            if arch not in ARCHES:
                raise ValueError(f"{key!r} is not an architecture ({', '.join(ARCHES)})")
            out[arch] = spec
        return out


# --- matchbox -----------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class MatchboxBoot(_Lenient):
    kernel: str = ""
    initrd: list[str] | None = None
    args: list[str] | None = None


class MatchboxProfile(_Lenient):
    """profiles/<id>.json (matchbox)"""

    id: str
    name: str = ""
    boot: MatchboxBoot | None = None
    ignition_id: str = ""
    generic_id: str = ""
    cloud_id: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v:
            raise ValueError("is required (matchbox refuses a profile without an id)")
        return v


class MatchboxGroup(_Lenient):
    """groups/<id>.json (matchbox)"""

    id: str = ""
    name: str = ""
    profile: str
    selector: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if not v:
            raise ValueError("is required (a group needs a profile)")
        return v
