"""bastion.settings: `bastion serve`'s options and environment variables come from one place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bastion.cli import main
from bastion.settings import Settings, SettingsError
from bastion_testkit import EXAMPLES, Server

SITE = EXAMPLES / "site"


def test_every_setting_with_an_option_shows_its_variable_in_serve_help():
    out = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        assert f"${field.alias}" in out, name
        if extra.get("option"):
            assert extra["option"] in out, name


def test_the_command_line_wins_then_the_environment_then_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("BASTION_LISTEN", ":9000")
    monkeypatch.setenv("BASTION_POLL_SECONDS", "7")
    monkeypatch.setenv("BASTION_DB", str(tmp_path / "env.db"))
    s = Settings.build(SITE, listen="10.1.2.3:8081")
    assert s.listen == ("10.1.2.3", 8081)  # command line
    assert s.poll_seconds == 7  # environment
    assert s.db_path == tmp_path / "env.db"
    assert s.ignition_token_ttl == 900  # default
    monkeypatch.setenv("BASTION_SITE", str(SITE))
    assert Settings.build().site_dir == SITE


def test_the_token_file_wins_over_the_token_variable(monkeypatch, tmp_path):
    f = tmp_path / "token"
    f.write_text("from-the-file-0123456789\n")
    monkeypatch.setenv("BASTION_API_TOKEN", "from-the-variable-0123456789")
    assert Settings.build(SITE).api_token == "from-the-variable-0123456789"
    monkeypatch.setenv("BASTION_API_TOKEN_FILE", str(f))
    assert Settings.build(SITE).api_token == "from-the-file-0123456789"


@pytest.mark.parametrize("token", ["t\u00f6ken-t\u00f6ken-t\u00f6ken-0123", "two words-0123456789"])
def test_a_token_an_http_header_cannot_carry_is_refused_where_it_is_given(token, monkeypatch, tmp_path):
    # It travels as "Authorization: Bearer ...", ASCII: a token with an o-umlaut was taken by
    # serve, no client could ever send it, and the CLI said the URL was wrong
    from bastion.settings import SettingsError, resolve_token

    f = tmp_path / "token"
    f.write_text(token + "\n")
    says = "has a space or a character outside ASCII"
    with pytest.raises(SettingsError, match=f"the API token in {f} {says}"):
        Settings.build(SITE, token_file=f)
    monkeypatch.setenv("BASTION_API_TOKEN", token)
    with pytest.raises(SettingsError, match=f"the API token in \\$BASTION_API_TOKEN {says}"):
        Settings.build(SITE)
    with pytest.raises(SettingsError, match=says):
        resolve_token()  # a client's, before any URL is tried
    monkeypatch.setenv("BASTION_API_TOKEN", "short")
    assert resolve_token() == "short"  # a client's token is the controller's to judge


@pytest.mark.parametrize(("given", "size"), [
    ("1048576", 1048576), ("64KiB", 65536), ("64kib", 65536), ("1MiB", 1048576), ("1M", 10**6),
    ("2 MB", 2 * 10**6), ("4096B", 4096),
])  # fmt: skip
def test_max_body_takes_sizes_as_people_write_them(given, size, monkeypatch):
    assert Settings.build(SITE, max_body=given).max_body == size
    monkeypatch.setenv("BASTION_MAX_BODY", given)
    assert Settings.build(SITE).max_body == size
    monkeypatch.delenv("BASTION_MAX_BODY")
    assert Settings.build(SITE).max_body == 1024 * 1024


@pytest.mark.parametrize(("env", "value", "message"), [
    ("BASTION_LISTEN", "nope", "--listen 'nope': expected HOST:PORT"),
    ("BASTION_TFTP", "x:y", "--tftp 'x:y': expected HOST:PORT"),
    ("BASTION_POLL_SECONDS", "-1", "--poll -1: expected seconds, 0 (never) to 86400"),
    ("BASTION_POLL_SECONDS", "nan", "--poll nan: expected seconds, 0 (never) to 86400"),
    ("BASTION_POLL_SECONDS", "soon", "--poll 'soon'"),
    ("BASTION_IGNITION_TOKEN_TTL", "100000", "--ignition-token-ttl 100000: expected seconds"),
    ("BASTION_MAX_BODY", "lots", "--max-body 'lots': expected a size in bytes"),
    ("BASTION_MAX_BODY", "1.5MiB", "--max-body '1.5MiB': expected a size in bytes"),
    ("BASTION_MAX_BODY", "100", "--max-body 100: expected 1KiB to 1GiB"),
    ("BASTION_MAX_BODY", "2GiB", "--max-body 2147483648: expected 1KiB to 1GiB"),
    ("BASTION_MAX_CONNECTIONS", "0", "--max-connections 0: expected 1 or more"),
    ("BASTION_MAX_CONNECTIONS", "many", "--max-connections 'many'"),
    ("BASTION_HEADER_TIMEOUT", "0", "--header-timeout 0: expected seconds, more than 0"),
    ("BASTION_BODY_TIMEOUT", "7200", "--body-timeout 7200: expected seconds, more than 0 and at most 3600"),
])  # fmt: skip
def test_a_bad_value_from_the_environment_names_the_option(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as e:
        Settings.build(SITE)
    assert message in str(e.value)


def test_serve_refuses_a_bad_setting_with_a_usage_error(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("BASTION_LISTEN", "nope")
    r = CliRunner().invoke(main, ["serve", "--site", str(SITE), "--db", str(tmp_path / "e.db")])
    assert r.exit_code == 2 and "--listen 'nope': expected HOST:PORT" in r.output, r.output
    monkeypatch.delenv("BASTION_LISTEN")
    r = CliRunner().invoke(main, ["serve"])
    assert r.exit_code == 2 and "--site is required (or $BASTION_SITE)" in r.output, r.output


def test_serve_warns_of_a_token_file_every_user_may_read(tmp_path):
    """Whoever reads the token manages the site (power, edits, consoles): a file made under
    umask 022 (0644) was taken without a word. install-service's 0640 is fine."""
    site = tmp_path / "site"
    shutil.copytree(SITE, site)
    token = tmp_path / "token"
    token.write_text("from-the-file-0123456789\n")
    logs = []
    for mode in (0o644, 0o640, 0o602):
        token.chmod(mode)
        server = Server(site, tmp_path / f"events-{mode:o}.db", None, args=("--token-file", str(token)))
        server.stop()
        logs.append(server.log.read_text())
    assert (f"warning: the API token file {token} can be read by every user on this host (mode "
            f"0644): chmod o-rw {token}") in logs[0]  # fmt: skip
    assert "API token file" not in logs[1]
    assert "can be written by every user on this host (mode 0602)" in logs[2]
