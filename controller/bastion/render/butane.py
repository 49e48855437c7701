"""Butane (variant flatcar, also fcos) to Ignition 3.3.0: our own translation of the common subset.

Butane's fields are Ignition's, spelled in snake_case (`ssh_authorized_keys` for
`sshAuthorizedKeys`, `size_mib` for `sizeMiB`), plus some sugar this module also implements:

- `inline:` and `local:` contents (files, appended fragments, key files, CAs, merged configs),
  turned into `data:` URLs; `local:` is read from the site's files directory and may not leave it;
- `contents_local:` for systemd units and drop-ins, `ssh_authorized_keys_local:` for users
  (flatcar 1.1.0);
- `with_mount_unit:` on filesystems (a generated `.mount` or `.swap` unit).

Not supported, each with a clear error: `storage.trees`, the fcos-only `boot_device` and `grub`
sections, and everything only Ignition 3.4.0 can express (LUKS `discard`/`open_options`/`cex`,
Tang `advertisement`, `arn:` sources, setuid/setgid/sticky modes): Butane flatcar 1.1.0 targets
Ignition 3.4.0, but we serve 3.3.0, so a 1.1.0 config renders only while it uses none of that.

Invariant: `translate(text, name, files)` returns a valid Ignition 3.3.0 dict or raises
ButaneError whose message names the file and the line of each problem.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from bastion import yamlfile
from bastion.render import ignition
from bastion.render.ignition import Obj

FLATCAR_VERSIONS = ("1.0.0", "1.1.0")
FCOS_VERSIONS = ("1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0")
_SNAKE_OVERRIDES = {"sizeMiB": "size_mib", "startMiB": "start_mib"}


class ButaneError(ValueError):
    def __init__(self, name: str, problems: list[tuple[int | None, str]]):
        self.name = name
        self.problems = problems
        lines = [f"{name}:{line}: {msg}" if line else f"{name}: {msg}" for line, msg in problems]
        super().__init__("\n".join(lines))


def snake(name: str) -> str:
    if name in _SNAKE_OVERRIDES:
        return _SNAKE_OVERRIDES[name]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class _Context:
    def __init__(self, name: str, files: LocalFiles, variant: str, version: str):
        self.name = name
        self.files = files
        self.variant = variant
        self.version = version
        self.problems: list[tuple[int | None, str]] = []
        self.lines: dict[str, int] = {}  # Ignition JSON path -> source line
        self.mount_units: list[dict] = []

    def problem(self, line: int | None, ypath: str, msg: str) -> None:
        self.problems.append((line, f"{ypath}: {msg}" if ypath else msg))

    def has_local_sugar(self) -> bool:
        return self.variant != "flatcar" or self.version >= "1.1.0"


def _line(container: Any, key: Any) -> int | None:
    """The line of container[key]'s value."""
    if isinstance(container, (yamlfile.LineDict, yamlfile.LineList)):
        return container.line_of(key)
    return None


def _key_line(container: Any, key: Any) -> int | None:
    """The line of the key itself (for problems with the key, not its value)."""
    if isinstance(container, yamlfile.LineDict):
        return container.key_lines.get(key, container.line)
    return _line(container, key)


def translate(text: str, name: str, files: LocalFiles | Path | None = None) -> dict:
    """Translate Butane YAML `text` (file `name`) into a valid Ignition 3.3.0 config. `local:`
    reads `files` (the loaded site's LocalFiles; a directory is read now)."""
    if not isinstance(files, LocalFiles):
        files = LocalFiles(files)
    try:
        doc = yamlfile.load(text, name)
    except yamlfile.YamlError as e:
        raise ButaneError(name, [(e.line, e.problem)]) from None
    if not isinstance(doc, dict):
        raise ButaneError(name, [(getattr(doc, "line", 1) or 1, "a Butane config must be a mapping")])
    variant, version = doc.get("variant"), doc.get("version")
    if variant not in ("flatcar", "fcos"):
        raise ButaneError(
            name, [(_line(doc, "variant"), f"variant: must be flatcar (or fcos), not {variant!r}")]
        )
    known = FLATCAR_VERSIONS if variant == "flatcar" else FCOS_VERSIONS
    if version not in known:
        raise ButaneError(
            name,
            [(_line(doc, "version"), f"version: {version!r} is not a supported {variant} version "
              f"({', '.join(known)})")],
        )
    ctx = _Context(name, files, variant, version)
    out: dict[str, Any] = {"ignition": {"version": ignition.SPEC_VERSION}}
    for key, value in doc.items():
        line = _line(doc, key)
        if key in ("variant", "version"):
            continue
        if key in ("boot_device", "grub"):
            ctx.problem(_key_line(doc, key), key, f"the fcos {key} section is not supported by Edge Bastion")
            continue
        camel = _camel_of(ignition.SPEC, key)
        if camel is None:
            ctx.problem(_key_line(doc, key), key, "is not a Butane field")
            continue
        if value is None:
            continue
        kind = ignition.SPEC.fields[camel]
        if camel == "ignition":
            value = _object(value, kind, key, f"$.{camel}", ctx, line)
            if value is not None:
                value.pop("version", None)
                out["ignition"].update(value)
            continue
        result = _object(value, kind, key, f"$.{camel}", ctx, line)
        if result is not None:
            out[camel] = result
    if ctx.mount_units:
        units = out.setdefault("systemd", {}).setdefault("units", [])
        taken = {u.get("name") for u in units}
        units.extend(u for u in ctx.mount_units if u["name"] not in taken)
    if not ctx.problems:
        for p in ignition.validate(out):
            ctx.problem(_nearest_line(ctx.lines, p.path), _butane_path(p.path), p.message)
    if ctx.problems:
        raise ButaneError(name, ctx.problems)
    return out


def _camel_of(kind: Obj, key: Any) -> str | None:
    if not isinstance(key, str):
        return None
    for camel in kind.fields:
        if snake(camel) == key:
            return camel
    return None


def _later_of(kind: Obj, key: str) -> str | None:
    for camel in kind.later:
        if snake(camel) == key:
            return camel
    return None


def _nearest_line(lines: dict[str, int], path: str) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return lines.get("$")


def _butane_path(jpath: str) -> str:
    parts = re.split(r"(\.|\[)", jpath.removeprefix("$."))
    return "".join(snake(p) if p not in (".", "[") and not p.endswith("]") else p for p in parts)


def _value(value: Any, kind: Any, ypath: str, jpath: str, ctx: _Context, line: int | None) -> Any:
    if line is not None:
        ctx.lines[jpath] = line
    if isinstance(kind, Obj):
        return _object(value, kind, ypath, jpath, ctx, line)
    if isinstance(kind, list):
        if not isinstance(value, list):
            ctx.problem(line, ypath, "must be a list")
            return None
        items = []
        for i, item in enumerate(value):
            item_line = _line(value, i)
            items.append(_value(item, kind[0], f"{ypath}[{i}]", f"{jpath}[{len(items)}]", ctx, item_line))
        return items
    why = ignition.type_problem(value, kind)
    if why:
        ctx.problem(line, ypath, f"{why}, not {value!r}")
        return None
    return value


def _object(value: Any, kind: Obj, ypath: str, jpath: str, ctx: _Context, line: int | None) -> Any:
    if line is not None:
        ctx.lines[jpath] = line
    if not isinstance(value, dict):
        ctx.problem(line, ypath, f"must be a mapping, not {value!r}")
        return None
    out: dict[str, Any] = {}
    sugar = _SUGAR.get(kind.name)
    for key, item in value.items():
        key_line = _line(value, key)
        sub_y = f"{ypath}.{key}"
        if sugar and key in sugar[0]:
            continue  # handled below, after the plain fields
        if kind.name == "storage" and key == "trees":
            ctx.problem(_key_line(value, key), sub_y, "storage.trees is not supported by Edge Bastion")
            continue
        later = _later_of(kind, key) if isinstance(key, str) else None
        if later:
            ctx.problem(
                _key_line(value, key), sub_y,
                f"needs Ignition spec 3.4.0; Edge Bastion serves {ignition.SPEC_VERSION}",
            )
            continue
        camel = _camel_of(kind, key)
        if camel is None:
            ctx.problem(_key_line(value, key), sub_y, f"is not a field of {kind.name}")
            continue
        if item is None:
            continue
        result = _value(item, kind.fields[camel], sub_y, f"{jpath}.{camel}", ctx, key_line)
        if result is not None:
            out[camel] = result
    if sugar:
        sugar[1](value, out, ypath, jpath, ctx, line)
    return out


# ---------------------------------------------------------------------------------------------
# Sugar
# ---------------------------------------------------------------------------------------------


#: The largest file a Butane `local:` puts into an Ignition config (inline, as a data URL).
MAX_LOCAL_FILE = 16 << 20
# What one load of files/ holds in memory at most, all files together (a reload holds two
# loads for a moment). Files past it are read by no `local:`, which says why; a site's files/
# that only holds configs is a few KB.
MAX_LOCAL_TOTAL = 128 << 20


class LocalFiles:
    """The site's files/ as one load of the site read it: what `local:`, `contents_local:` and
    `ssh_authorized_keys_local:` take their contents from. Rendering reads this, never the disk:
    a file deleted, or half-written by an editor, under files/ reaches nodes only with a reload
    that loads (the two looks of SiteHolder.poll, the site's checks), and a failed reload keeps
    the last good site's files as it keeps its templates.

    Every regular file under files/ is read (at most MAX_LOCAL_FILE each, MAX_LOCAL_TOTAL in
    all, in name order: a file past it is refused when a `local:` names it); symlinks are
    recorded with where they resolve, and `read` follows them as Path.resolve would, refusing
    a path that leaves files/ (through a symlink or `..`), a directory, a FIFO or a device
    (never opened: a FIFO hung the loader), and a file too big for an Ignition config.
    """

    def __init__(self, files_dir: Path | None):
        self.unusable: str | None = None  # why no `local:` can be read at all
        self._data: dict[str, bytes] = {}  # real path under files/ -> contents
        self._refused: dict[str, str] = {}  # real path -> why ("{path}" stands for files/<path>)
        self._links: dict[str, str | None] = {}  # symlink's real path -> its target's, None: outside
        self._dirs: set[str] = {""}
        self._held = 0  # bytes in _data
        if files_dir is None:
            self.unusable = "local: needs the site's files/ directory, which does not exist"
            return
        base = files_dir.resolve()
        if not base.is_relative_to(files_dir.parent.resolve()):
            self.unusable = "the site's files/ is a symlink that leaves the site directory"
            return
        self._walk(base, base, "")

    def _walk(self, base: Path, d: Path, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            self._refused[prefix.rstrip("/")] = f"cannot read files/{{path}}: {e.strerror}"
            return
        for entry in entries:
            rel = prefix + entry.name
            try:
                if entry.is_symlink():
                    try:
                        target = Path(entry.path).resolve()
                    except (OSError, RuntimeError):  # a loop: Python 3.11 raises RuntimeError
                        self._refused[rel] = "cannot read files/{path}: Too many levels of symbolic links"
                        continue
                    if target == base:
                        self._links[rel] = ""
                    elif target.is_relative_to(base):
                        self._links[rel] = target.relative_to(base).as_posix()
                    else:
                        self._links[rel] = None
                elif entry.is_dir(follow_symlinks=False):
                    self._dirs.add(rel)
                    self._walk(base, Path(entry.path), rel + "/")
                else:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        self._refused[rel] = "files/{path} is not a regular file"
                    elif st.st_size > MAX_LOCAL_FILE:
                        self._refused[rel] = (f"files/{{path}} is {st.st_size} bytes: more than an Ignition "
                                              f"config should carry ({MAX_LOCAL_FILE}; serve it as an asset)")  # fmt: skip
                    elif self._held + st.st_size > MAX_LOCAL_TOTAL:
                        self._refused[rel] = (f"files/{{path}} is not read: files/ holds more than "
                                              f"{MAX_LOCAL_TOTAL} bytes, read in name order; serve big "
                                              "files as assets")  # fmt: skip
                    else:
                        with open(entry.path, "rb") as f:
                            data = f.read(MAX_LOCAL_FILE + 1)  # it may have grown since stat
                        if len(data) > MAX_LOCAL_FILE:
                            self._refused[rel] = (f"files/{{path}} is more than {MAX_LOCAL_FILE} bytes: "
                                                  "more than an Ignition config should carry")  # fmt: skip
                        elif self._held + len(data) > MAX_LOCAL_TOTAL:  # it grew since stat
                            self._refused[rel] = (f"files/{{path}} is not read: files/ holds more than "
                                                  f"{MAX_LOCAL_TOTAL} bytes, read in name order")  # fmt: skip
                        else:
                            self._data[rel] = data
                            self._held += len(data)
            except OSError as e:
                self._refused[rel] = f"cannot read files/{{path}}: {e.strerror}"

    def _real(self, rel: str) -> str | None:
        """`rel`'s real path under files/ as Path.resolve would find it then; None if it leaves."""
        parts: list[str] = []
        hops = 0
        todo = [p for p in rel.split("/") if p not in ("", ".")]
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not parts:
                    return None
                parts.pop()
                continue
            here = "/".join([*parts, part])
            if here not in self._links:
                parts.append(part)
                continue
            target = self._links[here]
            hops += 1
            if hops > 40:  # as the kernel's MAXSYMLINKS
                raise LocalFileRefused(f"cannot read files/{rel}: Too many levels of symbolic links")
            if target is None:
                return None
            parts = [p for p in target.split("/") if p]
        return "/".join(parts)

    def read(self, rel: str) -> bytes:
        """The contents of files/`rel` when the site loaded, or raise LocalFileRefused."""
        if self.unusable:
            raise LocalFileRefused(self.unusable)
        real = self._real(rel)
        if real is None:
            raise LocalFileRefused(f"{rel!r} leaves the files/ directory")
        if real in self._data:
            return self._data[real]
        if real in self._refused:
            raise LocalFileRefused(self._refused[real].format(path=rel))
        if real in self._dirs:
            raise LocalFileRefused(f"files/{rel} is not a regular file")
        raise LocalFileRefused(f"files/{rel} does not exist")


class LocalFileRefused(ValueError):
    """A `local:` path that LocalFiles does not give: the message says why."""


def _read_local(ctx: _Context, rel: Any, ypath: str, line: int | None) -> bytes | None:
    if not isinstance(rel, str) or not rel:
        ctx.problem(line, ypath, "must be a relative path to a file under files/")
        return None
    if ctx.files.unusable:
        ctx.problem(line, ypath, ctx.files.unusable)
        return None
    if Path(rel).is_absolute() or "\\" in rel:
        ctx.problem(line, ypath, f"{rel!r} must be relative to files/")
        return None
    try:
        return ctx.files.read(rel)
    except LocalFileRefused as e:
        ctx.problem(line, ypath, str(e))
    return None


def _resource_sugar(value: dict, out: dict, ypath: str, jpath: str, ctx: _Context, line: int | None) -> None:
    given = [k for k in ("source", "inline", "local") if value.get(k) is not None]
    if len(given) > 1:
        ctx.problem(line, ypath, f"{', '.join(given)} are mutually exclusive")
        return
    if not given or given[0] == "source":
        return
    key = given[0]
    key_line = _line(value, key)
    if value.get("compression") not in (None, ""):
        ctx.problem(_line(value, "compression"), f"{ypath}.compression",
                    f"cannot be set with {key} (Edge Bastion compresses {key} contents itself)")
        return
    if key == "inline":
        if not isinstance(value["inline"], str):
            ctx.problem(key_line, f"{ypath}.inline", f"must be a string, not {value['inline']!r}")
            return
        data = value["inline"].encode()
    else:
        data = _read_local(ctx, value["local"], f"{ypath}.local", key_line)
        if data is None:
            return
    url, compression = ignition.data_url(data)
    out["source"] = url
    if compression:
        out["compression"] = compression
    ctx.lines[f"{jpath}.source"] = key_line or line or 0


def _contents_local_sugar(value: dict, out: dict, ypath: str, jpath: str, ctx: _Context, line: int | None) -> None:
    if value.get("contents_local") is None:
        return
    key_line = _line(value, "contents_local")
    if not ctx.has_local_sugar():
        ctx.problem(key_line, f"{ypath}.contents_local", "needs Butane flatcar version 1.1.0")
        return
    if value.get("contents") is not None:
        ctx.problem(key_line, ypath, "contents and contents_local are mutually exclusive")
        return
    data = _read_local(ctx, value["contents_local"], f"{ypath}.contents_local", key_line)
    if data is not None:
        try:
            out["contents"] = data.decode()
        except UnicodeDecodeError:
            ctx.problem(key_line, f"{ypath}.contents_local", "is not UTF-8 text")
        ctx.lines[f"{jpath}.contents"] = key_line or 0


def _user_sugar(value: dict, out: dict, ypath: str, jpath: str, ctx: _Context, line: int | None) -> None:
    files = value.get("ssh_authorized_keys_local")
    if files is None:
        return
    key_line = _line(value, "ssh_authorized_keys_local")
    if not ctx.has_local_sugar():
        ctx.problem(key_line, f"{ypath}.ssh_authorized_keys_local", "needs Butane flatcar version 1.1.0")
        return
    if not isinstance(files, list):
        ctx.problem(key_line, f"{ypath}.ssh_authorized_keys_local", "must be a list")
        return
    keys = out.setdefault("sshAuthorizedKeys", [])
    for i, rel in enumerate(files):
        data = _read_local(ctx, rel, f"{ypath}.ssh_authorized_keys_local[{i}]", _line(files, i))
        if data is None:
            continue
        for text in data.decode(errors="replace").splitlines():
            if text.strip() and not text.lstrip().startswith("#"):
                keys.append(text.strip())
    ctx.lines[f"{jpath}.sshAuthorizedKeys"] = key_line or 0


def systemd_escape(path: str) -> str:
    """`systemd-escape --path`: /var/lib/x -> var-lib-x; other bytes as \\xNN."""
    trimmed = "/".join(p for p in path.split("/") if p)
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def _filesystem_sugar(value: dict, out: dict, ypath: str, jpath: str, ctx: _Context, line: int | None) -> None:
    flag = value.get("with_mount_unit")
    if flag is None:
        return
    key_line = _line(value, "with_mount_unit")
    if not isinstance(flag, bool):
        ctx.problem(key_line, f"{ypath}.with_mount_unit", "must be a boolean")
        return
    if not flag:
        return
    device, fmt, where = out.get("device"), out.get("format"), out.get("path")
    if not device or not fmt:
        ctx.problem(key_line, ypath, "with_mount_unit needs device and format")
        return
    options = ",".join(out.get("mountOptions") or [])
    dev = systemd_escape(device)
    if fmt == "swap":
        body = f"[Swap]\nWhat={device}\n" + (f"Options={options}\n" if options else "")
        unit = {"name": f"{dev}.swap", "enabled": True,
                "contents": f"# Generated by Edge Bastion from {ypath}\n{body}\n"
                            "[Install]\nRequiredBy=swap.target\n"}  # fmt: skip
    else:
        if not where:
            ctx.problem(key_line, ypath, "with_mount_unit needs a path for a mounted filesystem")
            return
        body = (
            f"[Unit]\nRequires=systemd-fsck@{dev}.service\nAfter=systemd-fsck@{dev}.service\n\n"
            f"[Mount]\nWhere={where}\nWhat={device}\nType={fmt}\n"
            + (f"Options={options}\n" if options else "")
        )
        unit = {"name": f"{systemd_escape(where)}.mount", "enabled": True,
                "contents": f"# Generated by Edge Bastion from {ypath}\n{body}\n"
                            "[Install]\nRequiredBy=local-fs.target\n"}  # fmt: skip
    ctx.mount_units.append(unit)


# object name -> (extra Butane keys, function that turns them into Ignition fields)
_SUGAR = {
    "resource": (("inline", "local"), _resource_sugar),
    "unit": (("contents_local",), _contents_local_sugar),
    "dropin": (("contents_local",), _contents_local_sugar),
    "user": (("ssh_authorized_keys_local",), _user_sugar),
    "filesystem": (("with_mount_unit",), _filesystem_sugar),
}
