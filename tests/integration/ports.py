"""Free loopback ports for private brokers and services in integration tests."""

from __future__ import annotations

import socket


def free_ports(count: int = 2) -> tuple[int, ...]:
    """`count` distinct ports the OS had free a moment ago (bound together, then released)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()
