"""Process-level setup shared by every console script: logging, the allocator, torch CPU threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import sys
import time
from typing import Callable, Mapping

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
    measured about 10% of a push+pull round trip. The price is that the process
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


# --- torch CPU threads: several paramhub processes on one machine must not each take all cores ---

PARAMHUB_SCRIPTS = frozenset({"ps-worker", "ps-server", "ps-eval"})
PARAMHUB_MODULES = frozenset({"paramhub.worker.cli", "paramhub.ps.cli", "paramhub.worker.eval_cli"})
# Python options that take the next argument as their value (``python -X dev -m ...``).
_PYTHON_OPTIONS_WITH_VALUE = frozenset({"-X", "-W", "-Q"})


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """How many torch intra-op threads this process uses, and why (for the log)."""

    threads: int
    source: str  # "explicit" (--threads N), "OMP_NUM_THREADS", or "auto"
    cpus: float | None = None
    peers: int | None = None
    peers_from: str = "processes"  # "processes" (counted in /proc) or "LOCAL_WORLD_SIZE"
    quota: bool = False  # the CPU count came from a cgroup quota

    def describe(self) -> str:
        """``torch threads: 1 (2 CPUs, 2 local paramhub processes)``."""
        if self.source == "explicit":
            why = f"--threads {self.threads}"
        elif self.source == "OMP_NUM_THREADS":
            why = f"OMP_NUM_THREADS={self.threads}"
        else:
            cpus = f"{self.cpus:g} CPUs" + (" by cgroup quota" if self.quota else "")
            peers = (f"LOCAL_WORLD_SIZE={self.peers}" if self.peers_from == "LOCAL_WORLD_SIZE"
                     else f"{self.peers} local paramhub process{'es' if self.peers != 1 else ''}")
            why = f"{cpus}, {peers}"
        return f"torch threads: {self.threads} ({why})"


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def choose_threads(explicit: int, cpus: float, counted_peers: int, env: Mapping[str, str],
                   quota: bool = False) -> ThreadChoice:
    """The torch intra-op thread count of this process; pure, so tests check the arithmetic.

    Precedence: ``--threads N`` (``explicit`` > 0), then ``OMP_NUM_THREADS`` (torch
    honours it too), then auto: the CPUs this process may use divided by its local
    peers, at least 1. The peers are torchrun's ``LOCAL_WORLD_SIZE`` when set, else
    ``counted_peers`` (the paramhub processes found on this machine, this one included).
    """
    if explicit > 0:
        return ThreadChoice(explicit, "explicit")
    omp = _positive_int(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        return ThreadChoice(omp, "OMP_NUM_THREADS")
    local_world = _positive_int(env.get("LOCAL_WORLD_SIZE"))
    peers = local_world if local_world is not None else max(1, counted_peers)
    return ThreadChoice(max(1, int(cpus // peers)), "auto", cpus=cpus, peers=peers,
                        peers_from="LOCAL_WORLD_SIZE" if local_world is not None else "processes", quota=quota)


def is_paramhub_command(argv: list[str]) -> bool:
    """Whether a command line runs ps-worker, ps-server or ps-eval.

    Matches the console script run directly (``ps-worker ...``) or through its
    interpreter (``python /usr/bin/ps-worker ...``, as a shebang runs it), and
    ``python -m paramhub.worker.cli ...``; not ``python -c ...`` (multiprocessing's
    spawned children), nor another program that merely names a script in its arguments.
    """
    if not argv:
        return False
    if os.path.basename(argv[0]) in PARAMHUB_SCRIPTS:
        return True
    if not os.path.basename(argv[0]).startswith("python"):
        return False
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) in PARAMHUB_MODULES
        if arg.startswith("-m"):
            return arg[2:] in PARAMHUB_MODULES
        if arg == "-c" or arg.startswith("-c") or arg == "-":
            return False
        if arg in _PYTHON_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return os.path.basename(arg) in PARAMHUB_SCRIPTS
    return False


def _parent_pid(proc: pathlib.Path, pid: str) -> str | None:
    try:
        stat = (proc / pid / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[1] if len(fields) > 1 else None


def local_paramhub_pids(proc: str | os.PathLike = "/proc") -> set[int]:
    """The live paramhub processes on this machine (this one included when it is one), from ``/proc``.

    A paramhub process's own children with the same command line (DataLoader
    workers forked from a ps-worker) are not peers: they share their parent's budget.
    Zombies have an empty cmdline and do not count. Empty when ``proc`` cannot be read.
    """
    root = pathlib.Path(proc)
    try:
        pids = [entry.name for entry in root.iterdir() if entry.name.isdigit()]
    except OSError:
        return set()
    found = set()
    for pid in pids:
        try:
            raw = (root / pid / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if is_paramhub_command([part.decode(errors="replace") for part in raw.split(b"\0") if part]):
            found.add(pid)
    return {int(pid) for pid in found if _parent_pid(root, pid) not in found}


def count_local_paramhub_processes(proc: str | os.PathLike = "/proc") -> int:
    """How many ``local_paramhub_pids`` there are (0 when ``proc`` cannot be read)."""
    return len(local_paramhub_pids(proc))


def _read_quota(path: pathlib.Path, kind: str) -> float | None:
    """CPUs allowed by one cgroup directory's quota, None when it sets none (or has no such file)."""
    try:
        if kind == "v2":
            quota, period = (path / "cpu.max").read_text().split()[:2]
        else:
            quota = (path / "cpu.cfs_quota_us").read_text().strip()
            period = (path / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or float(period) <= 0 or float(quota) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit(proc: str | os.PathLike = "/proc",
                     cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup quota allows this process (1.5 for ``cpu.max`` "150000 100000"), None when unlimited.

    Reads the process's own cgroup from ``/proc/self/cgroup`` (v2 ``0::/path``, v1
    ``N:cpu,cpuacct:/path``) and takes the smallest quota of that cgroup and its
    ancestors under ``cgroup_root``; inside a container whose cgroup path is not
    mounted, the mount's root stands for it.
    """
    root = pathlib.Path(cgroup_root)
    try:
        lines = (pathlib.Path(proc) / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[pathlib.Path, str]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            mounts = [root]
            kind = "v2"
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            kind = "v1"
        else:
            continue
        for mount in mounts:
            if mount.is_dir():
                directory = mount / relative if relative else mount
                while True:  # the cgroup, then each ancestor up to the mount
                    candidates.append((directory, kind))
                    if directory == mount or mount not in directory.parents:
                        break
                    directory = directory.parent
                break
    if not candidates:  # no /proc/self/cgroup: the root of whichever hierarchy is mounted
        candidates = [(root, "v2"), (root / "cpu", "v1"), (root / "cpu,cpuacct", "v1")]
    limits = [limit for path, kind in candidates if (limit := _read_quota(path, kind)) is not None]
    return min(limits) if limits else None


def available_cpus(proc: str | os.PathLike = "/proc",
                   cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[float, bool]:
    """The CPUs this process may use: its affinity mask, capped by a cgroup quota; and whether the quota capped it."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit(proc, cgroup_root)
    return (quota, True) if quota is not None and quota < affinity else (float(affinity), False)


def decide_threads(explicit: int = 0, env: Mapping[str, str] | None = None) -> ThreadChoice:
    """``choose_threads`` on this machine's CPUs and paramhub processes."""
    env = os.environ if env is None else env
    if explicit > 0 or _positive_int(env.get("OMP_NUM_THREADS")) is not None:
        return choose_threads(explicit, 1, 1, env)  # no need to read /proc
    cpus, quota = available_cpus()
    peers = 1 if _positive_int(env.get("LOCAL_WORLD_SIZE")) else count_local_paramhub_processes()
    return choose_threads(explicit, cpus, peers, env, quota=quota)


class ThreadRecheck:
    """Re-decides the thread count at most every ``interval_s`` and applies it when it changed.

    Peers that start at the same moment may not see each other at start, so the
    worker's training loop calls this after every step; a call between checks
    costs one clock read.
    """

    def __init__(self, current: int, decide: Callable[[], ThreadChoice], set_threads: Callable[[int], None],
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None, prefix: str = ""):
        self.current = current
        self._decide, self._set, self._clock = decide, set_threads, clock
        self._interval = interval_s
        self._next = clock() + interval_s
        self._log = logger or logging.getLogger("paramhub")
        self._prefix = prefix

    def __call__(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._interval
        choice = self._decide()
        if choice.threads != self.current:
            self._set(choice.threads)
            self._log.info("%s%s, was %d", self._prefix, choice.describe(), self.current)
            self.current = choice.threads


_recheck: ThreadRecheck | None = None


def recheck_threads() -> None:
    """Called by the training loop after each step: a no-op unless ``configure_torch_threads`` chose auto."""
    if _recheck is not None:
        _recheck()


def configure_torch_threads(explicit: int, logger: logging.Logger, prefix: str = "",
                            recheck: bool = False) -> ThreadChoice:
    """Decides and applies this process's torch threads at start, in one INFO line naming the inputs.

    With ``recheck`` and an auto choice, ``recheck_threads`` re-counts the local
    peers while training and follows the count.
    """
    global _recheck
    import torch

    choice = decide_threads(explicit)
    torch.set_num_threads(choice.threads)
    logger.info("%s%s", prefix, choice.describe())
    if recheck and choice.source == "auto":
        _recheck = ThreadRecheck(choice.threads, decide_threads, torch.set_num_threads, logger=logger, prefix=prefix)
    return choice
