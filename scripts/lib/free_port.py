"""free_port(): a free port on 127.0.0.1 for a server a script starts (bench.py,
check-edge-routes.py)."""

import socket

_GIVEN_PORTS = set()


def free_port():
    """A free port on 127.0.0.1, never one this run handed out before (a port closed here
    can come back from the kernel before its server has bound it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
