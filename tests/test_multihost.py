"""The cluster of deploy/docker-compose.yml, with each client on a host of its own.

One ps-server, two ps-workers on their own shards and one ps-eval, as compose describes them,
run with the command lines of the compose file itself (its ${VAR:-default} settings filled in
as deploy/.env would, the container paths moved to a temp dir). The server runs in the root
network namespace and listens on 0.0.0.0 with a token from PARAMHUB_TOKEN, as compose's does;
each worker and the evaluator run in a network namespace of their own (tests/netns.py) and
reach the server at their gateway address, across a veth link, never over loopback.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import subprocess
import sys
import time

import pytest
import yaml  # a dev dependency (pyproject.toml [dev]): no skip without it

from netns import Host, require_netns
from paramhub.common.checkpoint import list_checkpoints, load_checkpoint
from paramhub.ps.ledger import Ledger
from paramhub.tools.cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMPOSE = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "docker-compose.yml"
TOKEN = "multihost-test-token"
MAX_STEPS = 20
# The compose settings (what deploy/.env sets) for a run of seconds on 2 CPU cores.
SETTINGS = {"MODEL": "mlp", "NUM_CLASSES": "4", "MAX_STEPS": str(MAX_STEPS), "CHECKPOINT_EVERY": "10",
            "IMAGE_SIZE": "8", "TRAIN_DATA": "synthetic", "VAL_DATA": "synthetic"}
# What the test adds to compose's command lines: small batches, one torch thread per process
# (the cores are shared), and bounded waits.
WORKER_EXTRA = ["--batch-size=8", "--synthetic-size=256", "--threads=1", "--connect-timeout=60", "--log-every=5"]
EVAL_EXTRA = ["--eval-size=64", "--batch-size=32", "--connect-timeout=60"]
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_commands() -> dict[str, list[str]]:
    """Each compose service's command line, ${VAR:-default} filled in from SETTINGS (else the default)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]

    def fill(arg: str) -> str:
        return COMPOSE_VARIABLE.sub(lambda m: SETTINGS.get(m.group(1), m.group(2) or ""), arg)

    return {name: [fill(arg) for arg in service["command"]] for name, service in services.items()}


def services_running(commands: dict[str, list[str]], program: str) -> dict[str, list[str]]:
    return {name: argv for name, argv in commands.items() if argv[0] == program}


def adapt(argv: list[str], root: pathlib.Path, drop: tuple[str, ...] = (), **values: str) -> list[str]:
    """A compose command line's flags for this test.

    Container paths (/checkpoints/...) move under ``root``; the flags in ``drop`` go; each of
    ``values`` (``server="10.213.5.1:4242"``) replaces that flag's value.
    """
    flags = []
    for arg in argv[1:]:
        assert arg.startswith("--"), f"expected --flag or --flag=value in compose, got {arg!r}"
        flag, sep, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        if flag in drop:
            continue
        if name in values:
            value = values[name]
        elif value.startswith("/checkpoints"):
            value = str(root / value.lstrip("/"))
        flags.append(f"{flag}{sep}{value}")
    return flags


def shard_of(argv: list[str]) -> int:
    (shard,) = [int(arg.split("=", 1)[1]) for arg in argv if arg.startswith("--shard=")]
    return shard


def wait_for_log(cluster: LocalCluster, pattern: str, timeout: float = 90) -> None:
    """Waits (bounded) until the server's log matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, cluster.read_log("server")):
        if cluster.server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the server's log:\n{cluster.read_log('server')}")
        time.sleep(0.1)


def test_the_compose_cluster_trains_across_hosts(tmp_path):
    require_netns()
    commands = compose_commands()
    (server_argv,) = services_running(commands, "ps-server").values()
    workers = services_running(commands, "ps-worker")
    (eval_argv,) = services_running(commands, "ps-eval").values()
    assert len(workers) == 2 and sorted(map(shard_of, workers.values())) == [0, 1]

    # Random subnets: another test (or another run of this one) may hold hosts at the same time.
    hosts = [Host(n) for n in random.sample(range(100, 250), len(workers) + 1)]
    try:
        with LocalCluster(tmp_path / "run", env={"PARAMHUB_TOKEN": TOKEN}) as cluster:
            # Port 0 (LocalCluster's) instead of compose's 50051. Sync rounds instead of compose's
            # async ones, so that every version needs both workers: in a 20-version async run the
            # first worker could finish alone before the second one has started.
            port = cluster.start_server(*adapt(server_argv, tmp_path, drop=("--port", "--mode", "--staleness")),
                                        "--mode=sync")
            for host in hosts:
                # Another host: the server's loopback is not its loopback.
                probe = subprocess.run([*host.wrapper, sys.executable, "-c",
                                        f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"],
                                       capture_output=True, timeout=30)
                assert probe.returncode != 0, f"{host.name} reaches the server over loopback"
            eval_host, *worker_hosts = hosts
            # The evaluator first, so it has joined before the run can end.
            eval_server = f"{eval_host.gateway}:{port}"
            cluster.start_evaluator(*adapt(eval_argv, tmp_path, server=eval_server), *EVAL_EXTRA,
                                    server=eval_server, wrapper=eval_host.wrapper)
            wait_for_log(cluster, r"observer .* joined")
            for host, argv in zip(worker_hosts, workers.values()):
                server = f"{host.gateway}:{port}"
                cluster.start_worker(shard_of(argv), *adapt(argv, tmp_path, server=server), *WORKER_EXTRA,
                                     server=server, wrapper=host.wrapper)
            codes = cluster.wait(timeout=240)
            logs = {name: cluster.read_log(name) for name in codes}
    finally:
        for host in hosts:
            host.remove()

    assert codes == {"server": 0, "worker0": 0, "worker1": 0, "eval": 0}, logs
    for shard in (0, 1):
        assert f"[worker {shard}/2] done after" in logs[f"worker{shard}"], logs[f"worker{shard}"]

    # Both workers contributed to every version (sync rounds of N = 2), by the final checkpoint's ledger.
    server_params = dict(arg[2:].split("=", 1) for arg in server_argv[1:] if "=" in arg)
    checkpoints = list_checkpoints(tmp_path / server_params["checkpoint-dir"].lstrip("/"))
    _, server_state, meta = load_checkpoint(checkpoints[-1])
    assert meta["version"] == MAX_STEPS
    ledger = Ledger.from_tensors(server_state)
    assert sorted({entry.version for entry in ledger.entries}) == list(range(1, MAX_STEPS + 1))
    assert len(ledger.applied_per_worker) == 2 and min(ledger.applied_per_worker.values()) == MAX_STEPS, \
        ledger.applied_per_worker

    # The evaluator scored the final version and kept a best model where compose says.
    eval_params = dict(arg[2:].split("=", 1) for arg in eval_argv[1:] if "=" in arg)
    records = [json.loads(line) for line in
               (tmp_path / eval_params["out"].lstrip("/")).read_text().splitlines()]
    assert records and records[-1]["version"] == MAX_STEPS
    assert (tmp_path / eval_params["checkpoint-dir"].lstrip("/") / "best.json").exists()
