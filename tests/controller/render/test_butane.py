"""bastion.render.butane: our Butane -> Ignition 3.3.0 translation, judged by ignition-validate."""

import gzip
import json
import textwrap
from pathlib import Path

import pytest
from bastion_testkit import assert_valid_ignition
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.render.butane import ButaneError, systemd_escape, translate
from bastion.render.ignition import decode_data_url


def bu(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def contents(cfg: dict, path: str) -> bytes:
    f = next(f for f in cfg["storage"]["files"] if f["path"] == path)
    data = decode_data_url(f["contents"]["source"])
    return gzip.decompress(data) if f["contents"].get("compression") == "gzip" else data


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    (d / "motd").write_text("welcome\n")
    (d / "big.txt").write_text("a line that repeats\n" * 1000)
    (d / "unit.service").write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    (d / "keys.pub").write_text("ssh-ed25519 AAAA key1\n# a comment\n\nssh-ed25519 BBBB key2\n")
    (tmp_path / "secret").write_text("outside")
    return d


FULL = bu(
    """
    variant: flatcar
    version: 1.1.0
    ignition:
      timeouts:
        http_total: 30
    kernel_arguments:
      should_exist: [quiet]
    passwd:
      users:
        - name: core
          ssh_authorized_keys: [ssh-ed25519 CCCC key3]
          ssh_authorized_keys_local: [keys.pub]
          groups: [docker]
        - name: svc
          no_create_home: true
          should_exist: true
      groups:
        - name: ops
          gid: 4000
    storage:
      disks:
        - device: /dev/vdb
          wipe_table: true
          partitions:
            - number: 1
              label: DATA
              size_mib: 0
              start_mib: 0
              type_guid: 0FC63DAF-8483-4772-8E79-3D69D8477DE4
      filesystems:
        - device: /dev/disk/by-partlabel/DATA
          format: ext4
          path: /var/lib/data
          label: data
          mount_options: [noatime]
          with_mount_unit: true
        - device: /dev/vdc
          format: swap
          with_mount_unit: true
      files:
        - path: /etc/hostname
          mode: 0644
          overwrite: true
          contents:
            inline: node1
        - path: /etc/motd
          contents:
            local: motd
        - path: /opt/big.txt
          contents:
            local: big.txt
          user:
            name: core
          group:
            id: 500
        - path: /opt/remote
          contents:
            source: https://example.com/remote
            verification:
              hash: sha256-0000000000000000000000000000000000000000000000000000000000000000
            http_headers:
              - name: Authorization
                value: Bearer x
          append:
            - inline: more
      directories:
        - path: /var/lib/data/sub
          mode: 0750
      links:
        - path: /etc/localtime
          target: /usr/share/zoneinfo/UTC
          overwrite: true
    systemd:
      units:
        - name: local.service
          enabled: true
          contents_local: unit.service
          dropins:
            - name: 10-env.conf
              contents: |
                [Service]
                Environment=A=1
        - name: masked.service
          mask: true
    """
)


def test_full_subset_translates_to_valid_ignition(files_dir, tmp_path):
    cfg = translate(FULL, "full.bu", files_dir)
    assert_valid_ignition(cfg, tmp_path)
    assert cfg["ignition"] == {"version": "3.3.0", "timeouts": {"httpTotal": 30}}
    assert cfg["kernelArguments"] == {"shouldExist": ["quiet"]}
    core = cfg["passwd"]["users"][0]
    assert core["sshAuthorizedKeys"] == ["ssh-ed25519 CCCC key3", "ssh-ed25519 AAAA key1", "ssh-ed25519 BBBB key2"]
    assert cfg["passwd"]["users"][1] == {"name": "svc", "noCreateHome": True, "shouldExist": True}
    part = cfg["storage"]["disks"][0]["partitions"][0]
    assert part == {"number": 1, "label": "DATA", "sizeMiB": 0, "startMiB": 0,
                    "typeGuid": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}  # fmt: skip
    assert contents(cfg, "/etc/hostname") == b"node1"
    assert contents(cfg, "/etc/motd") == b"welcome\n"
    assert contents(cfg, "/opt/big.txt") == (files_dir / "big.txt").read_bytes()
    big = next(f for f in cfg["storage"]["files"] if f["path"] == "/opt/big.txt")
    assert big["contents"]["compression"] == "gzip"  # large and compressible
    assert big["user"] == {"name": "core"} and big["group"] == {"id": 500}
    remote = next(f for f in cfg["storage"]["files"] if f["path"] == "/opt/remote")
    assert remote["contents"]["httpHeaders"] == [{"name": "Authorization", "value": "Bearer x"}]
    assert decode_data_url(remote["append"][0]["source"]) == b"more"
    hostname = next(f for f in cfg["storage"]["files"] if f["path"] == "/etc/hostname")
    assert hostname["mode"] == 0o644 and hostname["overwrite"] is True
    units = {u["name"]: u for u in cfg["systemd"]["units"]}
    assert units["local.service"]["contents"] == (files_dir / "unit.service").read_text()
    assert units["local.service"]["dropins"] == [{"name": "10-env.conf", "contents": "[Service]\nEnvironment=A=1\n"}]
    mount = units["var-lib-data.mount"]
    assert "Where=/var/lib/data\n" in mount["contents"] and "Options=noatime\n" in mount["contents"]
    assert "What=/dev/disk/by-partlabel/DATA\n" in mount["contents"] and mount["enabled"] is True
    assert "[Swap]\nWhat=/dev/vdc\n" in units["dev-vdc.swap"]["contents"]


def test_matchbox_style_flatcar_1_1_install_config(tmp_path):
    text = bu(
        """
        ---
        variant: flatcar
        version: 1.1.0
        systemd:
          units:
            - name: installer.service
              enabled: true
              contents: |
                [Unit]
                Requires=network-online.target
                [Service]
                Type=simple
                ExecStart=/opt/installer
                [Install]
                WantedBy=multi-user.target
        storage:
          files:
            - path: /opt/installer
              mode: 0500
              contents:
                inline: |
                  #!/bin/bash -ex
                  flatcar-install -d /dev/vda -i ignition.json
        passwd:
          users:
            - name: core
              ssh_authorized_keys:
                - ssh-ed25519 SET_PUBKEY_HERE
        """
    )
    cfg = translate(text, "flatcar-install.yaml")
    assert_valid_ignition(cfg, tmp_path)
    assert cfg["storage"]["files"][0]["mode"] == 0o500
    assert contents(cfg, "/opt/installer").startswith(b"#!/bin/bash -ex\n")


@pytest.mark.parametrize("variant, version", [("flatcar", "1.0.0"), ("flatcar", "1.1.0"), ("fcos", "1.4.0"), ("fcos", "1.5.0")])
def test_versions(variant, version, tmp_path):
    cfg = translate(f"variant: {variant}\nversion: {version}\n", "v.bu")
    assert cfg == {"ignition": {"version": "3.3.0"}}
    assert_valid_ignition(cfg, tmp_path)


# (name, Butane text, expected line, words the message must contain)
BROKEN = [
    ("bad yaml", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n   - path: /a\n  - path: /b\n", 6, "expected"),
    ("tab indentation", "variant: flatcar\nversion: 1.1.0\nstorage:\n\tfiles: []\n", 4, "tab"),
    ("duplicate key", "variant: flatcar\nversion: 1.1.0\nsystemd: {}\nsystemd: {}\n", 4, "given twice"),
    ("variant", "variant: fedora\nversion: 1.1.0\n", 1, "variant"),
    ("version", "variant: flatcar\nversion: 2.0.0\n", 2, "not a supported flatcar version"),
    ("unknown top key", "variant: flatcar\nversion: 1.1.0\nstorrage: {}\n", 3, "storrage: is not a Butane field"),
    ("unknown nested key", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      mdoe: 420\n", 6, "storage.files[0].mdoe: is not a field of file"),
    ("wrong type", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      mode: rw-r--r--\n", 6, "must be an integer"),
    ("list expected", "variant: flatcar\nversion: 1.1.0\nsystemd:\n  units:\n    name: a.service\n", 5, "must be a list"),
    ("relative path", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: etc/x\n", 5, "path not absolute"),
    ("unit name", "variant: flatcar\nversion: 1.1.0\nsystemd:\n  units:\n    - name: foo\n      enabled: true\n", 5, "invalid systemd unit extension"),
    ("3.4-only luks", "variant: flatcar\nversion: 1.1.0\nstorage:\n  luks:\n    - name: d\n      device: /dev/vda\n      discard: true\n", 7, "needs Ignition spec 3.4.0"),
    ("3.4-only setuid", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      mode: 04755\n", 6, "need Ignition spec 3.4.0"),
    ("inline and local", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      contents:\n        inline: x\n        local: motd\n", 7, "mutually exclusive"),
    ("local escape", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      contents:\n        local: ../secret\n", 7, "leaves the files/ directory"),
    ("local absolute", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      contents:\n        local: /etc/passwd\n", 7, "must be relative"),
    ("local missing", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      contents:\n        local: nope.txt\n", 7, "files/nope.txt does not exist"),
    ("contents_local in 1.0.0", "variant: flatcar\nversion: 1.0.0\nsystemd:\n  units:\n    - name: a.service\n      contents_local: unit.service\n", 6, "needs Butane flatcar version 1.1.0"),
    ("trees", "variant: flatcar\nversion: 1.1.0\nstorage:\n  trees:\n    - local: x\n", 4, "storage.trees is not supported"),
    ("fcos boot_device", "variant: fcos\nversion: 1.4.0\nboot_device:\n  mirror: {}\n", 3, "not supported"),
    ("not a mapping", "- a\n- b\n", 1, "must be a mapping"),
    ("unit syntax", "variant: flatcar\nversion: 1.1.0\nsystemd:\n  units:\n    - name: a.service\n      contents: |\n        [Unit]\n        no equals sign here\n", 6, "expected key=value"),
]


@pytest.mark.parametrize("name, text, line, words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_butane_names_file_and_line(name, text, line, words, files_dir):
    with pytest.raises(ButaneError) as e:
        translate(text, "ignition/worker.bu", files_dir)
    assert e.value.problems[0][0] == line, str(e.value)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"ignition/worker.bu:{line}: "), first
    assert words in first, first


def test_several_problems_are_all_reported():
    text = "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /a\n      mdoe: 1\n    - path: /b\n      mode: x\n"
    with pytest.raises(ButaneError) as e:
        translate(text, "w.bu")
    assert [p[0] for p in e.value.problems] == [6, 8]


def test_systemd_escape_matches_systemd():
    assert systemd_escape("/var/lib/data") == "var-lib-data"
    assert systemd_escape("/") == "-"
    assert systemd_escape("/dev/disk/by-label/x y") == "dev-disk-by\\x2dlabel-x\\x20y"
    assert systemd_escape("/srv/.hidden") == "srv-.hidden"


yaml_scalars = st.one_of(st.integers(-5, 70000), st.booleans(), st.text(max_size=8), st.none())
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["path", "name", "files", "units", "contents", "inline", "mode", "x", "users", "storage", "systemd"]), children, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["storage", "systemd", "passwd", "ignition", "junk"]), yaml_values, max_size=3))
def test_any_document_translates_or_raises_butane_error(doc):
    text = json.dumps({"variant": "flatcar", "version": "1.1.0", **doc})
    try:
        cfg = translate(text, "fuzz.bu")
    except ButaneError as e:
        assert e.problems and all(isinstance(msg, str) for _, msg in e.problems)
        return
    assert cfg["ignition"]["version"] == "3.3.0"
