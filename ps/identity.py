"""What a peer may call itself at Join, and how peer-provided text goes into the server's log.

A worker name ends up in every log line about that worker, in Status replies,
on the status page and in checkpoints, so it is bounded and plain: letters,
digits and ``. _ - : @``, at most ``MAX_NAME_CHARS``. That admits hostnames,
Kubernetes pod and service names (``paramhub-worker-3``, ``job-worker-0-0.svc``),
docker-compose container names (``deploy-worker-1``), ``shard-0@host`` and the
names the workers give themselves (``shard-<i>``); an empty name lets the server
pick one (``worker-<id>``).
"""

from __future__ import annotations

import re

from paramhub.ps.errors import InvalidArgument

MAX_NAME_CHARS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9._:@-]*")
FIRST_SHARD = -1  # -1: the worker did not say which shard it trains on
LOG_TEXT_CHARS = 300  # peer-provided text is cut to this in a log line


def is_plain_name(name: str) -> bool:
    """Whether ``name`` follows the rule above."""
    return len(name) <= MAX_NAME_CHARS and NAME_PATTERN.fullmatch(name) is not None


def check_join(worker_name: str, shard: int) -> None:
    """Refuses a Join whose name or shard no real worker sends.

    Raises:
        InvalidArgument: the name is too long or has other characters than
            letters, digits and ``. _ - : @``; or the shard is below -1.
    """
    if len(worker_name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"worker name of {len(worker_name)} characters: at most {MAX_NAME_CHARS} are accepted")
    if not NAME_PATTERN.fullmatch(worker_name):
        raise InvalidArgument(
            f"worker name {printable(worker_name)!r} has characters other than ASCII letters, digits and . _ - : @")
    if shard < FIRST_SHARD:
        raise InvalidArgument(f"shard {shard} is negative (-1 means none)")


def printable(text: object, limit: int = LOG_TEXT_CHARS) -> str:
    """``text`` made safe for one log line: control and non-ASCII characters escaped, cut at ``limit``.

    A peer's name, address or an error message quoting what it sent then cannot
    start a line of its own (a newline is written as the two characters ``\\n``)
    nor pass for other text (a Cyrillic ``а`` is written ``\\u0430``). Escaped text
    escapes to itself, so a name escaped once (a restored one) reads the same in every line.
    """
    escaped = "".join(c if c.isascii() and c.isprintable() else c.encode("unicode_escape").decode("ascii")
                      for c in str(text))  # a backslash stays one: escaping twice changes nothing
    if len(escaped) > limit:
        return f"{escaped[:limit]}...({len(escaped) - limit} more)"
    return escaped
