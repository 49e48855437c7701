"""bastion.ups.nut against NUT's real upsd and dummy-ups driver (nutkit), and its codec alone."""

from __future__ import annotations

import pytest
from bastion.ups.nut import NutClient, NutError, quote, words
from nutkit import PASSWORD, USER, NutServer, connect_in
from simkit import wait_for


def test_words_undo_quotes_and_escapes_and_quote_makes_them():
    assert words('VAR eaton ups.status "OB LB"') == ["VAR", "eaton", "ups.status", "OB LB"]
    assert words(r'VAR u d "say \"hi\" \\ there"') == ["VAR", "u", "d", 'say "hi" \\ there']
    assert words('VAR u d ""') == ["VAR", "u", "d", ""]
    for w in ("plain", "two words", 'a "q"', "back\\slash", ""):
        assert words("X " + quote(w)) == ["X", w]
    with pytest.raises(NutError):
        words('VAR u d "open')
    with pytest.raises(NutError):
        quote("line\nbreak")


@pytest.fixture
def upsd(tmp_path):
    with NutServer(tmp_path / "nut") as server:
        yield server


def client(upsd, **kw) -> NutClient:
    return NutClient(upsd.ups, "127.0.0.1", upsd.port, timeout=3, connect=connect_in(upsd.ns.name), **kw)


def test_reads_status_and_charge_from_the_real_upsd_and_follows_the_state_file(upsd):
    c = client(upsd, username=USER, password=PASSWORD)
    r = c.read()
    assert r.status == ("OL",) and r.charge == 100 and not r.on_battery
    assert r.variables["ups.mfr"] == "Edge Bastion tests"
    assert c.get("battery.charge") == "100"
    upsd.write("OB DISCHRG", 40)
    r = wait_for(lambda: (x := c.read()).on_battery and x, what="OB from upsd")
    assert r.status == ("OB", "DISCHRG") and r.charge == 40
    upsd.write("OB LB", 9)
    r = wait_for(lambda: (x := c.read()).low_battery and x, what="LB from upsd")
    assert r.charge == 9
    c.close()


def test_upsd_errors_are_named_and_a_stopped_upsd_is_reached_again_once_back(upsd):
    wrong = NutClient("nosuchups", "127.0.0.1", upsd.port, timeout=3, connect=connect_in(upsd.ns.name))
    with pytest.raises(NutError) as e:
        wrong.read()
    assert e.value.code == "UNKNOWN-UPS"
    c = client(upsd)
    assert c.read().status == ("OL",)
    upsd.stop_upsd()
    with pytest.raises(NutError, match="upsd at 127.0.0.1"):
        c.read()
    upsd.start_upsd()
    assert c.read().status == ("OL",)
