"""The servers that ps-bench measures against, each in a child process of its own.

``paramhub_server`` starts ps-server's own ``PSServer`` (sync, gradient mode, SGD
momentum 0.9, the model built in a grandchild as ps-server does), and
``socket_server`` the plain-socket echo (tools/socket_baseline.py), so neither
shares a GIL with the client. A child prints ``READY <port>`` once it listens and
exits when its stdin closes, so it goes away with the parent even if the parent is
killed. Also here: what the benchmarks read of a process in /proc.

The children are this module's command line (``python -m paramhub.tools.bench_servers``),
not a ps-bench subcommand.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import select
import subprocess
import sys
import threading
import time

import click

from paramhub.common.codec import DEFAULT_CHUNK_BYTES
from paramhub.common.models import ARCHS
from paramhub.common.runtime import keep_freed_memory_resident, setup_logging
from paramhub.tools import socket_baseline

NUM_CLASSES = 1000  # ResNet50's ImageNet head: 25.6M parameters, 102 MB of fp32
HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # a child imports torch and builds the model before it answers
STOP_TIMEOUT_S = 10.0
ROUND_TIMEOUT_S = 120.0  # a bench's sync round never waits longer than this for its pushes
_READY = b"READY "


# -- /proc -------------------------------------------------------------------------


def proc_status_kb(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM: peak resident set; VmRSS: current)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of a process so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


# -- the parent's side ---------------------------------------------------------------


class ServerProcess:
    """A server child: started at once, port read with a bound, always stopped.

    Args:
        args: the child's subcommand (``paramhub`` or ``socket``) and its options.
    """

    def __init__(self, args: list[str]):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paramhub.tools.bench_servers", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        """Waits for the child's ``READY <port>`` line; returns the port.

        Raises:
            click.ClickException: the child exited or stayed silent past ``timeout``.
        """
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise click.ClickException(f"{self.args[0]} server: no port after {timeout:.0f}s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                data = os.read(fd, 256)  # os.read, not readline: it cannot block past select
                if not data:  # stdout closed: the child is exiting
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=STOP_TIMEOUT_S)
                    code = self.proc.returncode
                    raise click.ClickException(f"{self.args[0]} server exited before it was ready (exit code {code})")
                line += data
        if not line.startswith(_READY):
            raise click.ClickException(f"{self.args[0]} server: unexpected output {line!r}")
        return int(line[len(_READY):])

    def stop(self) -> None:
        """Closes stdin (the child's signal to exit), then terminates and kills, each wait bounded."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        for escalate in (None, self.proc.terminate, self.proc.kill):
            if escalate is not None:
                escalate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def paramhub_server(model: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int = 1,
                    wire_dtype: str = "fp32", rss_file: str | None = None,
                    standby_for: str | None = None, replicate_in_wire_dtype: bool = False) -> ServerProcess:
    """Starts a PSServer child for ``model`` (sync rounds of ``workers`` pushes; ``rss_file``: see ``paramhub``).

    ``standby_for``: the child is the standby of the PSServer child at that address (ps-server --standby-for).
    """
    args = ["paramhub", "--model", model, "--chunk-bytes", str(chunk_bytes), "--workers", str(workers),
            "--wire-dtype", wire_dtype]
    return ServerProcess(args + (["--rss-file", rss_file] if rss_file else [])
                         + (["--standby-for", standby_for] if standby_for else [])
                         + (["--replicate-in-wire-dtype"] if replicate_in_wire_dtype else []))


def socket_server(nbytes: int) -> ServerProcess:
    """Starts a plain-socket echo child for messages of ``nbytes``."""
    return ServerProcess(["socket", "--nbytes", str(nbytes)])


# -- the children --------------------------------------------------------------------


def _announce(port: int) -> None:
    sys.stdout.buffer.write(_READY + f"{port}\n".encode())
    sys.stdout.flush()


def _wait_for_parent() -> None:
    """Blocks until the parent closes our stdin (or dies)."""
    sys.stdin.buffer.read()


@click.group()
def main():
    """Server children of ps-bench: each listens on a free port until its stdin closes."""


@main.command("paramhub")
@click.option("--model", required=True, type=click.Choice(ARCHS))
@click.option("--chunk-bytes", default=DEFAULT_CHUNK_BYTES, type=int)
@click.option("--workers", default=1, type=click.IntRange(min=1), help="N of a sync round.")
@click.option("--wire-dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--rss-file", default=None, help="Write the RSS after imports and once ready here (JSON).")
@click.option("--standby-for", default=None, help="Follow the PSServer at this address as its standby.")
@click.option("--replicate-in-wire-dtype", is_flag=True, help="As ps-server's flag.")
def serve_paramhub(model, chunk_bytes, workers, wire_dtype, rss_file, standby_for, replicate_in_wire_dtype):
    """A PSServer (sync, grad, SGD momentum 0.9) on a free port until stdin closes."""
    keep_freed_memory_resident()
    setup_logging("WARNING")
    from paramhub.common.config import ServerConfig, Timeouts
    from paramhub.common.models import initial_state_in_child
    from paramhub.ps.server import PSServer

    runtime_kb = proc_status_kb("self", "VmRSS")  # torch, grpc: before any tensor
    # A long lease: bench workers send no heartbeats, and may sit idle while the gloo group starts.
    timeouts = Timeouts(lease=900, round=ROUND_TIMEOUT_S, pull_wait=30)
    server = PSServer(ServerConfig(host=HOST, port=0, model=model, num_classes=NUM_CLASSES, workers=workers,
                                   mode="sync", update="grad", momentum=0.9, chunk_bytes=chunk_bytes,
                                   wire_dtype=wire_dtype, timeouts=timeouts, standby_for=standby_for,
                                   replicate_in_wire_dtype=replicate_in_wire_dtype),
                      build=initial_state_in_child)  # as ps-server: no torchvision in this process
    try:
        port = server.start()
        if rss_file:
            ready_kb = proc_status_kb("self", "VmRSS")
            pathlib.Path(rss_file).write_text(json.dumps({"runtime_kb": runtime_kb, "ready_kb": ready_kb}))
        _announce(port)
        _wait_for_parent()
    finally:
        server.shutdown(grace=0)


@main.command("socket")
@click.option("--nbytes", required=True, type=click.IntRange(min=1))
def serve_socket(nbytes):
    """The plain-socket echo server on a free port until stdin closes."""
    keep_freed_memory_resident()
    listener = socket_baseline.listen(HOST)
    # A daemon thread, so that the process ends when the parent goes, even mid-round.
    threading.Thread(target=socket_baseline.serve_echo, args=(listener, nbytes), daemon=True).start()
    _announce(listener.getsockname()[1])
    _wait_for_parent()


if __name__ == "__main__":
    main()
