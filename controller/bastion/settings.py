"""How the controller is configured: command-line options, falling back to environment variables.

    BASTION_SITE             the site directory
    BASTION_LISTEN           HOST:PORT to listen on (default 127.0.0.1:8080)
    BASTION_DB               the event history database (default: see default_db_path)
    BASTION_API_TOKEN        the management API bearer token, or
    BASTION_API_TOKEN_FILE   a file holding it (first line)
    BASTION_POLL_SECONDS     how often to look for changed site files (0: never; default 1)
    BASTION_DEVICE           the device's serial line (e.g. /dev/ttyACM0, the sim board's PTY)
    BASTION_TFTP             ADDR:PORT for the controller's own TFTP server (the site's tftp/);
                             unset: no TFTP
    BASTION_SECRETS_DIR      the secret store (default: bastion.state.secrets.default_secrets_dir)
    BASTION_IGNITION_TOKEN_TTL  seconds a one-time Ignition URL stays good (default 900)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_IGNITION_TOKEN_TTL = 15 * 60.0


class SettingsError(ValueError):
    pass


def default_db_path() -> Path:
    """$XDG_STATE_HOME/edge-bastion/events.db (~/.local/state/... when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edge-bastion" / "events.db"


def read_token_file(path: Path) -> str:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SettingsError(f"cannot read the API token file {path}: {e.strerror}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise SettingsError(f"the API token in {path} is too short (16 characters at least)")
    return token


def resolve_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The API token: explicit token, token file, $BASTION_API_TOKEN, $BASTION_API_TOKEN_FILE."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    if os.environ.get("BASTION_API_TOKEN"):
        return os.environ["BASTION_API_TOKEN"]
    if os.environ.get("BASTION_API_TOKEN_FILE"):
        return read_token_file(Path(os.environ["BASTION_API_TOKEN_FILE"]))
    return None


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{option} {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(frozen=True)
class Settings:
    site_dir: Path
    db_path: Path
    api_token: str | None = None
    poll_seconds: float = 1.0
    device_port: str | None = None  # the device's serial line (pyserial port or URL)
    tftp_listen: tuple[str, int] | None = None  # `serve --tftp ADDR:PORT`: serve tftp/ there
    # the secret store's directory; None: bastion.state.secrets.secrets_dir(<site name>) picks it
    secrets_dir: Path | None = None
    ignition_token_ttl: float = DEFAULT_IGNITION_TOKEN_TTL  # seconds (bastion.state.onetime)

    @classmethod
    def build(
        cls,
        site_dir: Path | str,
        db_path: Path | str | None = None,
        api_token: str | None = None,
        token_file: Path | None = None,
        poll_seconds: float | None = None,
        device_port: str | None = None,
        tftp: str | None = None,
        secrets_dir: Path | str | None = None,
        ignition_token_ttl: float | None = None,
    ) -> Settings:
        if poll_seconds is None:
            poll_seconds = float(os.environ.get("BASTION_POLL_SECONDS", "1"))
        db = db_path or os.environ.get("BASTION_DB") or default_db_path()
        tftp = tftp or os.environ.get("BASTION_TFTP") or None
        tftp_listen = None
        if tftp:
            tftp_listen = parse_listen(tftp, "--tftp")
            if not (Path(site_dir) / "tftp").is_dir():
                raise SettingsError(
                    f"--tftp {tftp}: the site has no tftp/ directory ({Path(site_dir) / 'tftp'}) "
                    "to serve"
                )
        if ignition_token_ttl is None:
            text = os.environ.get("BASTION_IGNITION_TOKEN_TTL") or str(DEFAULT_IGNITION_TOKEN_TTL)
            try:
                ignition_token_ttl = float(text)
            except ValueError:
                raise SettingsError(f"--ignition-token-ttl {text!r}: expected seconds") from None
        if not 0 < ignition_token_ttl <= 86400:
            raise SettingsError(
                f"--ignition-token-ttl {ignition_token_ttl:g}: expected seconds, more than 0 and at most 86400"
            )
        return cls(
            site_dir=Path(site_dir),
            db_path=Path(db),
            api_token=resolve_token(api_token, token_file),
            poll_seconds=poll_seconds,
            device_port=device_port or os.environ.get("BASTION_DEVICE") or None,
            tftp_listen=tftp_listen,
            secrets_dir=Path(secrets_dir) if secrets_dir else None,
            ignition_token_ttl=ignition_token_ttl,
        )
