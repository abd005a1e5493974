"""Server pushback: how a server that refuses a call as busy tells the client when to retry.

The refusal is RESOURCE_EXHAUSTED with the trailing metadata key
``grpc-retry-pushback-ms``, the name gRPC's retry design (proposal A6) gives a
server's "retry after this many milliseconds". A RESOURCE_EXHAUSTED without it (a
message over the size limit) is final: retrying sends the same bytes again.
"""

from __future__ import annotations

import grpc

PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that asks the client to retry after ``seconds``."""
    return ((PUSHBACK_KEY, str(max(0, round(seconds * 1000)))),)


def pushback_seconds(error: grpc.RpcError) -> float | None:
    """How long the server asked us to wait before retrying; None when it did not ask (do not retry).

    A6: a value that is not a non-negative integer means "do not retry".
    """
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            return int(value) / 1000 if str(value).isdigit() else None
    return None
