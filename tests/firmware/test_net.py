"""firmware.net's sockets under CPython (MicroPython's have no getsockname): a socket bound to
port 0, a TFTP transfer's, gets a port no other socket holds, the listener's included."""

from __future__ import annotations

import socket

from firmware import net


def test_sockets_bound_to_port_0_get_ports_of_their_own_even_beside_a_listener():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))  # a free port in the ephemeral range, as tests' listeners
        port = probe.getsockname()[1]
    listener = net.udp_socket("127.0.0.1", port)
    transfers = []
    try:
        for _ in range(1000):
            transfers.append(net.udp_socket("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in transfers]
        # With SO_REUSEADDR on port 0 too, 1,000 such sockets shared a few dozen ports here
        # (and one, in a CI run, the listener's: its DATA came from the listener's port).
        assert len(set(ports)) == len(ports) and port not in ports
    finally:
        listener.close()
        for s in transfers:
            s.close()
