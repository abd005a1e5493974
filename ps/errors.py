"""Errors the server raises, each tied to one gRPC status code (the only mapping)."""

from __future__ import annotations

import grpc


class PSError(Exception):
    """Base class; ``code`` is the gRPC status the client receives."""

    code = grpc.StatusCode.INTERNAL


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


class Unavailable(PSError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE
