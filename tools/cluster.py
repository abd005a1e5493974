"""A local cluster of real processes: one ps-server and N ps-workers on loopback.

Used by ``make demo`` and by the end-to-end tests. Every wait is bounded and every
process is killed on the way out, whatever happens.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time


def _console(script: str) -> list[str]:
    """The command that runs one of our console scripts with this interpreter."""
    module = {"ps-server": "paramhub.ps.cli", "ps-worker": "paramhub.worker.cli",
              "ps-eval": "paramhub.worker.eval_cli"}[script]
    return [sys.executable, "-m", module]


class LocalCluster:
    """Starts a server on a free port (``--port 0 --port-file``) and workers against it.

    Args:
        workdir: where logs and the port file go (a temp dir by default).
        env: extra environment for every process.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="paramhub-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.server: subprocess.Popen | None = None
        self.standby: subprocess.Popen | None = None  # a second ps-server (--standby-for), see start_server(name=)
        self.workers: list[subprocess.Popen] = []
        self.evaluator: subprocess.Popen | None = None
        self.port: int | None = None

    def log_path(self, name: str) -> pathlib.Path:
        return self.workdir / f"{name}.log"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_path(name), "ab")
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        finally:
            log.close()  # the child has its own handle

    def start_server(self, *args: str, port: int = 0, timeout: float = 60.0, wrapper: tuple[str, ...] = (),
                     name: str = "server") -> int:
        """Starts ps-server with ``args`` and waits (bounded) until it listens; returns its port.

        ``port=0`` lets the server pick a free port; a restart passes the old one.
        Each start appends to the same server log. ``wrapper`` as for ``start_worker``.
        ``name="standby"`` starts a second server (logged as ``standby``, kept in ``self.standby``).
        """
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn(name, [*wrapper, *_console("ps-server"), "--port", str(port), "--port-file",
                                  str(port_file), *args])
        setattr(self, name, proc)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"ps-server exited with {proc.returncode}:\n{self.read_log(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ps-server did not listen within {timeout}s:\n{self.read_log(name)}")
            time.sleep(0.05)
        bound = int(port_file.read_text())
        if name == "server":
            self.port = bound
        return bound

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_worker(self, shard: int, *args: str, server: str | None = None,
                     wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
        """Starts ps-worker for ``shard`` against the server.

        ``server`` overrides the address (another host's view of the server);
        ``wrapper`` prefixes the command (``ip netns exec NS`` runs it on another host).
        """
        proc = self._spawn(f"worker{shard}", [*wrapper, *_console("ps-worker"), "--server", server or self.address,
                                              "--shard", str(shard), *args])
        self.workers.append(proc)
        return proc

    def start_evaluator(self, *args: str, server: str | None = None,
                        wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
        """Starts ps-eval against the server (waited for like a worker, logged as ``eval``).

        ``server`` and ``wrapper`` as for ``start_worker``.
        """
        proc = self._spawn("eval", [*wrapper, *_console("ps-eval"), "--server", server or self.address, *args])
        self.evaluator = proc
        return proc

    def kill_server(self) -> None:
        """SIGKILLs the server (a crash: no checkpoint, no goodbye)."""
        self.server.kill()
        self.server.wait(timeout=10)

    def wait(self, timeout: float) -> dict[str, int]:
        """Waits for every process to exit (bounded); returns their exit codes by name."""
        deadline = time.monotonic() + timeout
        codes = {}
        named = ([("server", self.server), ("standby", self.standby)]
                 + [(f"worker{i}", w) for i, w in enumerate(self.workers)])
        if self.evaluator is not None:
            named.append(("eval", self.evaluator))
        for name, proc in named:
            if proc is None:
                continue
            try:
                codes[name] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{name} still running after {timeout}s:\n{self.read_log(name)}") from None
        return codes

    def read_log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Kills whatever is still running."""
        procs = self.workers + [p for p in (self.evaluator, self.server, self.standby) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
