"""Fault injection for tests, switched on by environment variables (as ps-lite's PS_DROP_MSG).

``PARAMHUB_FAULT_DIE_MID_PUSH=k``: the process kills itself with SIGKILL halfway
through sending its k-th push (a worker dying mid-push). Unset in production:
the check is one dictionary lookup per push.
"""

from __future__ import annotations

import os
import signal


def die_mid_push(sequence: int) -> bool:
    """True when this push is the one the environment says to die in."""
    return os.environ.get("PARAMHUB_FAULT_DIE_MID_PUSH") == str(sequence)


def die_now() -> None:
    """Kills this process at once, as a crash would."""
    os.kill(os.getpid(), signal.SIGKILL)
