"""The anchor of the transport benchmark: a plain TCP echo of N bytes.

This is the fastest a Python process can move the model's bytes over loopback:
both ends use preallocated buffers, ``sendall`` from a memoryview and
``recv_into`` a memoryview, so the only copies are the kernel's. paramhub's
push+pull is reported as a multiple of this round trip (BENCHMARKS.md,
"Transport").

One round: the client sends N bytes, the server receives all N and sends them
back, the client receives N. Receiving everything before answering mirrors a
push followed by a pull, and cannot deadlock on full socket buffers.
"""

from __future__ import annotations

import socket


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fills ``view`` from ``sock``; False if the peer closed before the first byte.

    Raises:
        ConnectionError: the peer closed part-way through.
    """
    filled = 0
    while filled < len(view):
        n = sock.recv_into(view[filled:])
        if n == 0:
            if filled == 0:
                return False
            raise ConnectionError(f"peer closed after {filled} of {len(view)} bytes")
        filled += n
    return True


def listen(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free port of ``host``."""
    return socket.create_server((host, 0))


def serve_echo(listener: socket.socket, nbytes: int) -> None:
    """Accepts one connection and echoes rounds of ``nbytes`` until the client closes it."""
    buffer = memoryview(bytearray(nbytes))
    conn, _ = listener.accept()
    listener.close()
    with conn:
        while recv_exactly(conn, buffer):
            conn.sendall(buffer)


class EchoClient:
    """The client end: sends a preallocated buffer and receives it back into another.

    Args:
        address: ``(host, port)`` of a running ``serve_echo``.
        nbytes: bytes per direction; must match the server's.
        timeout: seconds any single socket operation may block.
    """

    def __init__(self, address: tuple[str, int], nbytes: int, timeout: float = 60.0):
        self.nbytes = nbytes
        self._send = memoryview(bytearray(b"\x5a" * nbytes))
        self._recv = memoryview(bytearray(nbytes))
        self._sock = socket.create_connection(address, timeout=timeout)

    def round_trip(self) -> None:
        """Sends the N bytes and waits until all N have come back."""
        self._sock.sendall(self._send)
        if not recv_exactly(self._sock, self._recv):
            raise ConnectionError("echo server closed the connection")

    def check(self) -> bool:
        """True when the last round brought back exactly what was sent."""
        return self._recv == self._send

    def close(self) -> None:
        """Closes the connection (the server then exits its loop)."""
        self._sock.close()

    def __enter__(self) -> "EchoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
