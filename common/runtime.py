"""Process-level setup shared by every console script: logging and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import logging
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a structured field.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    then the fields passed with ``extra=`` (``event``, ``worker``, ``reason``, ...) and ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: value for key, value in record.__dict__.items()
                     if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)  # a field JSON cannot hold is written as its str()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logs on stderr: plain timestamped lines (``text``) or JSON lines (``json``).

    Messages carry their own ``[role id/step]`` prefix; the events that matter
    (round closed, push dropped, worker lost, run complete) also carry structured
    fields (``extra={"event": ...}``), which the JSON lines show as keys.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return None


def keep_freed_memory_resident() -> bool:
    """Asks glibc to keep freed memory for reuse instead of returning it to the OS, in one arena.

    Every push and pull allocates and frees buffers of the model's size; with
    glibc's defaults each of those is a fresh mmap that the kernel must zero, which
    measured about 10% of a round trip (DESIGN.md). The price is that the process
    keeps its peak heap resident, so all threads share one arena: with one per
    thread, gRPC's handler threads each kept their own freed message buffers
    (8 workers: 170-530 MB more at the peak, growing round after round; no CPU
    cost measured). Must run at process start; setting GLIBC_TUNABLES later has
    no effect. Disable with PARAMHUB_KEEP_MEMORY=0.

    Returns:
        True when the allocator was reconfigured.
    """
    libc = _glibc()
    if libc is None or os.environ.get("PARAMHUB_KEEP_MEMORY", "1") == "0":
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 512 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
                and libc.mallopt(_M_ARENA_MAX, 1))


def release_free_memory() -> None:
    """Returns the allocator's free memory to the OS once (after start-up built and dropped a model)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
