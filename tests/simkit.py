"""Helpers shared by tests in several folders."""

import socket


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free on host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
