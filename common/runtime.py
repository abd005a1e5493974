"""Process-level setup shared by every console script: logging and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def setup_logging(level: str = "INFO") -> None:
    """Plain timestamped logs on stderr; messages carry their own ``[role id/step]`` prefix."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def keep_freed_memory_resident() -> bool:
    """Asks glibc to keep freed memory for reuse instead of returning it to the OS.

    Every push and pull allocates and frees buffers of the model's size; with
    glibc's defaults each of those is a fresh mmap that the kernel must zero, which
    measured about 10% of a round trip (DESIGN.md). The price is that the process
    keeps its peak heap resident. Must run at process start; setting
    GLIBC_TUNABLES later has no effect. Disable with PARAMHUB_KEEP_MEMORY=0.

    Returns:
        True when the allocator was reconfigured.
    """
    if os.environ.get("PARAMHUB_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        big = 1 << 30
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 512 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, big))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
