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


def test_a_host_the_resolver_cannot_encode_is_a_nut_error():
    # A label over 63 characters: socket.create_connection raises UnicodeError (a ValueError),
    # which went past the watch's handler: the UPS view kept the last good reading.
    c = NutClient("eaton", "a" * 64, timeout=1)
    with pytest.raises(NutError, match="cannot reach upsd at a{64}:3493"):
        c.read()


def test_an_answer_that_trickles_in_ends_at_the_timeout():
    # One byte a second: every recv came within the timeout, and a pass took over an hour.
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"BEGIN LIST VAR eaton\n")
            while not stop.is_set():
                conn.sendall(b"V")
                time.sleep(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    c = NutClient("eaton", "127.0.0.1", server.getsockname()[1], timeout=1.5)
    started = time.monotonic()
    with pytest.raises(NutError, match=r"did not (finish its answer|answer) within 1.5 s"):
        c.read()
    assert time.monotonic() - started < 5
    stop.set()
    server.close()


def test_a_charge_that_is_not_a_number_is_not_a_reading():
    from bastion.ups.nut import Reading

    for text in ("nan", "inf", "-inf", "NaN"):
        assert Reading.of({"ups.status": "OL", "battery.charge": text}).charge is None
    assert Reading.of({"ups.status": "OL", "battery.charge": "55.5"}).charge == 55.5
