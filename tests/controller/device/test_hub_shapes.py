"""The controller's device hub against replies of the wrong shape: every field there, of the
wrong type (a device that is not this project's firmware, or a corrupted one). Against a
STAND-IN link that answers what a test scripts: the real link's framing and its checks of
frames are tested with the real firmware in test_device_link.py and test_device_sim.py."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.device.hub import DeviceHub, PowerTargetError, read_status
from bastion.site.load import load_site


class StandInLink:
    """STAND-IN for bastion.device.link.DeviceLink: ready, with scripted replies per op."""

    def __init__(self, replies: dict[str, Any], info: dict[str, Any] | None = None):
        self.replies, self.info, self.ready, self.last_error = replies, info or {}, True, None

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        return dict(self.replies[op])

    def counters(self) -> dict[str, int]:
        return {}

    def on_event(self, fn: Any) -> None: ...
    def on_resync(self, fn: Any) -> None: ...
    def on_console(self, fn: Any) -> None: ...


@pytest.mark.parametrize("power", [5, "on", {"ch": 1}, None])
def test_a_power_section_of_the_wrong_type_is_no_channels_not_a_crash(site_dir, power):
    # Every operator pass failed with "'int' object is not iterable" on {"power": 5}.
    site = load_site(site_dir)
    hub = DeviceHub("standin", lambda: site, lambda *a, **k: 0, link=StandInLink({"status": {"power": power}}))
    assert hub.channels() is None


def test_a_consoles_list_of_the_wrong_shape_is_no_console(site_dir):
    site = load_site(site_dir)
    link = StandInLink({}, info={"consoles": [1, 2, "x"]})
    hub = DeviceHub("standin", lambda: site, lambda *a, **k: 0, link=link)
    with pytest.raises(PowerTargetError):
        hub.console_channel("node1")
    link.info = {"consoles": 7}
    with pytest.raises(PowerTargetError):
        hub.console_channel("node1")


def test_a_partial_list_of_the_wrong_type_is_ignored():
    link = StandInLink({"status": {"power": [], "partial": 5}})
    assert read_status(link) == {"power": []}
