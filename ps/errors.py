"""Errors the server raises, each tied to one gRPC status code (the only mapping)."""

from __future__ import annotations

import grpc

from paramhub.common.pushback import pushback_metadata


class PSError(Exception):
    """Base class; ``code`` is the gRPC status the client receives."""

    code = grpc.StatusCode.INTERNAL
    trailing_metadata: tuple = ()  # sent with the status


class InvalidArgument(PSError):
    """The request itself is malformed: bad bytes, sizes, dtypes, NaN/Inf."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(PSError):
    """The request is well-formed but does not fit the server's state (layout, version, incarnation)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(PSError):
    """An unknown worker id: the worker must join (again)."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(PSError):
    """A message or stream larger than the server accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Busy(ResourceExhausted):
    """Too many streams open: refused at once, with a pushback telling the client when to retry."""

    def __init__(self, message: str, retry_after_s: float, limit: str = ""):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit  # which limit refused it, for the metrics
        self.trailing_metadata = pushback_metadata(retry_after_s)


class Unavailable(PSError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE


def abort_rpc(context, exc: PSError) -> None:
    """Ends the RPC with ``exc``'s status code, message and trailing metadata (a pushback); raises."""
    if exc.trailing_metadata:  # a pushback: when to retry
        context.set_trailing_metadata(exc.trailing_metadata)
    context.abort(exc.code, str(exc))
