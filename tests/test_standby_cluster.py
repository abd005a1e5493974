"""A standby in real processes: ps-server, ps-server --standby-for, two ps-workers (resnet18) and SIGKILL."""

from __future__ import annotations

import collections
import signal
import subprocess
import time

import pytest

from conftest import wait_for

from paramhub.common.checkpoint import list_checkpoints, load_checkpoint
from paramhub.common.config import Timeouts
from paramhub.ps.ledger import Ledger
from paramhub.tools.cluster import LocalCluster, _console
from paramhub.worker.client import PSClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
WORKER_ARGS = ("--image-size", "16", "--batch-size", "4", "--synthetic-size", "64", "--log-every", "1",
               "--connect-timeout", "30")


def status(address: str):
    with PSClient(address, Timeouts(rpc=5, connect=5)) as client:
        return client.status()


def final_ledger(ckpt) -> Ledger:
    _, server_state, _ = load_checkpoint(list_checkpoints(ckpt)[-1])
    return Ledger.from_tensors(server_state)


def server_args(mode: str, ckpt, max_steps: int) -> tuple[str, ...]:
    return ("--model", "resnet18", "--num-classes", "4", "--workers", "2", "--mode", mode, "--wire-dtype", "bf16",
            "--max-steps", str(max_steps), "--lr", "0.01", "--checkpoint-dir", str(ckpt), "--lease-timeout", "10",
            "--failover-after", "2", "--replication-timeout", "5")


def start_pair(cluster: LocalCluster, mode: str, tmp_path, max_steps: int,
               standby_args: tuple[str, ...] = ()) -> tuple[tuple[str, ...], int]:
    """The primary, its standby, two workers given both; returns the primary's args and the standby's port."""
    primary_args = server_args(mode, tmp_path / "primary", max_steps)
    cluster.start_server(*primary_args)
    standby_port = cluster.start_server(*server_args(mode, tmp_path / "standby", max_steps), "--standby-for",
                                        cluster.address, *standby_args, name="standby")
    wait_for(lambda: status(cluster.address).standby_state == "attached", 60, "standby attached", poll=0.2)
    for shard in (0, 1):
        cluster.start_worker(shard, *WORKER_ARGS, "--failover", f"127.0.0.1:{standby_port}")
    return primary_args, standby_port


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_primary_sigkilled_mid_run_the_run_completes_on_the_standby(tmp_path, mode):
    max_steps = 12 if mode == "sync" else 24
    with LocalCluster(tmp_path / "run") as cluster:
        # --linger: the promoted standby still answers when the old primary restarts after the run
        primary_args, standby_port = start_pair(cluster, mode, tmp_path, max_steps, standby_args=("--linger",))
        standby = f"127.0.0.1:{standby_port}"
        wait_for(lambda: status(cluster.address).version >= max_steps // 3, 90, "a third of the run", poll=0.05)
        cluster.kill_server()  # kill -9 while the workers push and pull
        killed = time.monotonic()
        at_kill = status(standby).version
        after = wait_for(lambda: (s := status(standby)).version > at_kill and s, 30, "an update on the standby",
                         poll=0.05)
        failover_s = time.monotonic() - killed
        assert after.role == "primary" and after.term == 2
        workers = {f"worker{i}": w.wait(timeout=120) for i, w in enumerate(cluster.workers)}
        # the old primary, restarted with its old command line, learns it was replaced and refuses
        restart_log = tmp_path / "restarted.log"
        with open(restart_log, "w") as out:
            restarted = subprocess.run([*_console("ps-server"), "--port", "0", *primary_args], stdout=out,
                                       stderr=subprocess.STDOUT, timeout=90, env=cluster.env)
        assert restarted.returncode != 0 and "refusing to serve" in restart_log.read_text(), restart_log.read_text()
        cluster.server = None
        cluster.standby.send_signal(signal.SIGTERM)  # it lingers with the final model until told
        codes = {**workers, **cluster.wait(timeout=60)}
        logs = {name: cluster.read_log(name) for name in ("standby", "worker0", "worker1")}
    assert codes == {"standby": 0, "worker0": 0, "worker1": 0}, logs
    print(f"\n{mode}: SIGKILL of the primary to the next applied update on the standby: {failover_s:.2f}s "
          f"(standby at version {at_kill} when killed)")
    assert failover_s < 10
    assert "taking over at version" in logs["standby"]
    ledger = final_ledger(tmp_path / "standby")
    per_version = collections.Counter(e.version for e in ledger.entries)
    assert sorted(per_version) == list(range(1, max_steps + 1))  # no gap: nothing lost, nothing recomputed twice
    assert set(per_version.values()) == ({2} if mode == "sync" else {1})  # sync: one push per worker and round
    pushes = [(e.worker_id, e.sequence) for e in ledger.entries]
    assert len(pushes) == len(set(pushes)), "a push was applied twice"
    assert len({e.worker_id for e in ledger.entries}) == 2  # the workers kept their ids on the standby


def test_the_standby_killed_the_primary_goes_on_unprotected(tmp_path):
    with LocalCluster(tmp_path / "run") as cluster:
        start_pair(cluster, "sync", tmp_path, max_steps=10)
        wait_for(lambda: status(cluster.address).version >= 3, 90, "version 3", poll=0.1)
        cluster.standby.send_signal(signal.SIGKILL)
        cluster.standby.wait(timeout=10)
        wait_for(lambda: status(cluster.address).standby_state == "unprotected", 20, "unprotected", poll=0.1)
        cluster.standby = None
        codes = cluster.wait(timeout=120)
        logs = {name: cluster.read_log(name) for name in codes}
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, logs
    assert "running UNPROTECTED" in logs["server"]
    per_version = collections.Counter(e.version for e in final_ledger(tmp_path / "primary").entries)
    assert sorted(per_version) == list(range(1, 11)) and set(per_version.values()) == {2}
