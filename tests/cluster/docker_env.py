"""Docker for the cluster test: a daemon (started here when none runs), compose, and containers.

Everything stays on loopback: the daemon is started with no bridge network and no iptables rules,
and every container runs on the host network (deploy/docker-compose.hostnet.yml). Every wait is
bounded; whatever this module started is stopped on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
from typing import Iterator

from conftest import wait_for
from test_deploy import compose_cli

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


class DockerUnavailable(RuntimeError):
    """No Docker daemon can be reached or started here (not root, no dockerd)."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``docker ARGS``; raises CalledProcessError (with its output) when ``check`` and it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
    return result


def daemon_answers() -> bool:
    """True when ``docker info`` reaches a daemon."""
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def docker_daemon(log_dir: pathlib.Path, timeout: float = 60) -> Iterator[None]:
    """A Docker daemon for the duration: the running one, or one started here (and stopped after).

    Raises:
        DockerUnavailable: none runs and this process cannot start one.
    """
    if daemon_answers():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise DockerUnavailable("no Docker daemon runs, and starting one needs root and dockerd")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "dockerd.log", "wb") as log:
        # --bridge=none --iptables=false: the daemon makes no private-range network and no NAT rules
        daemon = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(daemon_answers, timeout, "dockerd to answer (its log: dockerd.log)", poll=0.5)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


class Compose:
    """One compose project of deploy/docker-compose.yml + docker-compose.hostnet.yml.

    Args:
        project: the compose project name (containers are ``<project>_<service>_1``).
        env: the variables the compose files read (PS_PORT, MODEL, ...), on top of this process's.
    """

    FILES = ("docker-compose.yml", "docker-compose.hostnet.yml")

    def __init__(self, project: str, env: dict[str, str]):
        self.project = project
        self.env = {**os.environ, **env, "COMPOSE_PROJECT_NAME": project}
        cli = compose_cli()
        if cli is None:
            raise DockerUnavailable("neither `docker compose` nor `docker-compose` is installed")
        self.base = cli
        for name in self.FILES:
            self.base += ["-f", str(DEPLOY / name)]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``compose ARGS``; raises CalledProcessError with its output when it fails."""
        result = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode:
            raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def container(self, service: str) -> str:
        """The id of ``service``'s container."""
        ids = self.run("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"service {service}: {len(ids)} containers")
        return ids[0]

    def state(self, service: str) -> dict:
        """``docker inspect``'s State of ``service``'s container, plus its RestartCount."""
        info = json.loads(docker("inspect", self.container(service)).stdout)[0]
        return {**info["State"], "RestartCount": info["RestartCount"]}

    def logs(self, service: str) -> str:
        """Everything ``service``'s container wrote, across its restarts."""
        result = docker("logs", self.container(service), check=False)
        return result.stdout + result.stderr

    def down(self) -> None:
        """Removes the project's containers and volumes (whatever state they are in)."""
        subprocess.run([*self.base, "down", "-v", "--timeout", "10"], env=self.env, capture_output=True,
                       timeout=180)
