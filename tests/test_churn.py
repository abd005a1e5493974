"""Workers come and go during a run, as real processes with SIGKILLs: every sample of every epoch trained once.

One sync and one async run of ps-server --data-leases with ps-worker processes:
2 workers, then 4, then 1 (one stopped with SIGTERM, as a Job scaled down does,
two SIGKILLed mid-run), then 3 (two new names and one killed worker started
again). The check does not trust the lease table: every worker writes the
samples of each push it sends (--sample-log, flushed before the push leaves),
the final checkpoint's ledger says which pushes were applied, and the test
counts each (epoch, sample) over the applied pushes itself. Each epoch must
hold every sample exactly once; a joiner's first push must be applied within
2 rounds of the weights it pulled; the ledger must hold every version once.
"""

from __future__ import annotations

import collections
import json
import pathlib
import time

import pytest

from conftest import wait_for
from paramhub.common import checkpoint
from paramhub.ps.ledger import Ledger
from paramhub.tools.cluster import LocalCluster
from paramhub.worker.client import PSClient

SAMPLES, EPOCHS = 320, 3
WORKER_ARGS = ("--data", "synthetic", "--synthetic-size", str(SAMPLES), "--image-size", "16", "--batch-size", "8",
               "--log-every", "0", "--threads", "1", "--connect-timeout", "30")


def applied_samples(workdir: pathlib.Path, ledger: Ledger) -> tuple[collections.Counter, dict]:
    """(epoch, sample) -> times trained in applied pushes, from the workers' logs and the ledger alone;
    and each push's log record by (worker id, incarnation, sequence)."""
    logged = {}
    for path in workdir.glob("samples-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by SIGKILL: its push was never sent whole
            logged[(record["worker_id"], record["incarnation"], record["sequence"])] = record
    counts = collections.Counter()
    for entry in ledger.entries:
        key = (entry.worker_id, entry.incarnation, entry.sequence)
        assert key in logged, f"applied push {key} is in no worker's sample log"
        assert len(logged[key]["samples"]) == entry.num_samples
        counts.update((epoch, index) for epoch, index in logged[key]["samples"])
    return counts, logged


def exactly_once(counts: collections.Counter) -> list[str]:
    """What is wrong with ``counts`` for EPOCHS epochs of SAMPLES samples (empty: each trained once)."""
    problems = []
    for epoch in range(EPOCHS):
        seen = {index: counts[(epoch, index)] for index in range(SAMPLES) if counts[(epoch, index)]}
        missing = SAMPLES - len(seen)
        doubled = sum(1 for n in seen.values() if n > 1)
        if missing or doubled:
            problems.append(f"epoch {epoch}: {missing} samples skipped, {doubled} trained more than once")
    extra = {epoch for epoch, _ in counts} - set(range(EPOCHS))
    if extra:
        problems.append(f"samples of epochs {sorted(extra)} beyond the run's {EPOCHS}")
    return problems


class Churn:
    """Starts, kills and counts the workers of one run."""

    def __init__(self, cluster: LocalCluster, status: PSClient):
        self.cluster = cluster
        self.status = status
        self.procs: dict[str, object] = {}
        self.killed: set[str] = set()

    def start(self, name: str) -> None:
        index = len(self.cluster.workers)
        self.procs[name] = self.cluster.start_worker(
            index, *WORKER_ARGS, "--name", name, "--sample-log", str(self.cluster.workdir / f"samples-{name}.jsonl"))

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(timeout=10)
        self.killed.add(name)

    def terminate(self, name: str) -> int:
        """SIGTERM, as a Job scaled down sends: the worker leaves after its step (exit 143)."""
        self.procs[name].terminate()
        return self.procs[name].wait(timeout=60)

    def version(self) -> int:
        return self.status.status().version

    def live(self) -> int:
        return self.status.status().live_workers

    def wait_version(self, at_least: int, what: str) -> int:
        return wait_for(lambda: (v := self.version()) >= at_least and v, 90, what, poll=0.1)

    def wait_applied(self, names: list[str], what: str) -> None:
        """Until every named worker has had a push applied (it is a member, training)."""
        def applied():
            by_name = {w.worker_name: w.updates_applied for w in self.status.status().workers if w.alive}
            return all(by_name.get(name, 0) > 0 for name in names)
        wait_for(applied, 90, what, poll=0.1)


@pytest.mark.timeout(280)
@pytest.mark.parametrize("mode", [["--mode", "sync"], ["--mode", "async", "--staleness", "2"]], ids=["sync", "async"])
def test_workers_2_4_1_3_with_sigkills_train_every_sample_once(tmp_path, mode):
    server_args = ("--model", "resnet18", "--num-classes", "4", "--workers", "2", "--max-workers", "4",
                   "--data-leases", "--lease-size", "16", "--epochs", str(EPOCHS), "--wire-dtype", "bf16",
                   "--lr", "0.05", "--lease-timeout", "3", "--round-timeout", "30", "--checkpoint-dir",
                   str(tmp_path / "ckpt"), *mode)
    started = time.monotonic()
    with LocalCluster(tmp_path) as cluster:
        cluster.start_server(*server_args)
        with PSClient(cluster.address) as status:
            churn = Churn(cluster, status)
            churn.start("w0"), churn.start("w1")  # 2
            churn.wait_applied(["w0", "w1"], "the first two training")
            churn.start("w2"), churn.start("w3")  # 4
            churn.wait_applied(["w0", "w1", "w2", "w3"], "all four training")
            before_kills = churn.version()
            departures = status.status().departures
            assert churn.terminate("w3") == 143  # scaled down: it leaves, counted at once, not at lease expiry
            assert status.status().departures == departures + 1
            churn.kill("w1"), churn.kill("w2")  # 1, SIGKILLed mid-push or mid-step
            churn.wait_version(before_kills + 4, "w0 going on alone")
            churn.start("w4"), churn.start("w5"), churn.start("w1")  # 3: two new names, one restarted
            churn.wait_applied(["w0", "w4", "w5", "w1"], "three joiners training beside w0")
            churn_done = churn.version()
            summary = status.status()
        codes = cluster.wait(timeout=200)
        workdir = cluster.workdir
    for name, code in codes.items():
        assert code in (0, -9, 143), f"{name} exited with {code}"
    assert sorted(code for code in codes.values() if code) == [-9, -9, 143]  # the three stopped, no other death
    assert summary.max_workers == 4 and summary.joins >= 7

    path = checkpoint.list_checkpoints(tmp_path / "ckpt")[-1]
    _, server_state, meta = checkpoint.load_checkpoint(path)
    ledger = Ledger.from_tensors(server_state)
    final = meta["version"]
    assert final > churn_done, "the run ended before the churn was over: enlarge the data"
    assert sorted({e.version for e in ledger.entries}) == list(range(1, final + 1))  # every version, once
    keys = [(e.worker_id, e.incarnation, e.sequence) for e in ledger.entries]
    assert len(keys) == len(set(keys)), "a push applied twice"

    counts, logged = applied_samples(workdir, ledger)
    assert exactly_once(counts) == []
    assert meta["leases"]["completed"] == EPOCHS

    # every joiner's first push is applied within 2 rounds of the weights it pulled: sync, 2 versions (its
    # first push may miss the round it pulled for, the next one may not); async, its very first push, at
    # most --staleness 2 versions stale
    first = {}
    for entry in sorted(ledger.entries, key=lambda e: e.version):
        first.setdefault((entry.worker_id, entry.incarnation), entry)
    lags = {key: entry.version - logged[(*key, 1)]["base_version"] for key, entry in first.items()}
    if mode[1] == "sync":
        assert max(lags.values()) <= 2, lags
    else:
        assert all(entry.sequence == 1 and entry.staleness <= 2 for entry in first.values()), first
    print(f"\nchurn {mode[1]}: {final} versions, {len(ledger.entries)} pushes applied, {EPOCHS} epochs x {SAMPLES} "
          f"samples each once, {summary.joins} joins, {summary.departures} departures, versions from a joiner's "
          f"first pull to its first applied push {sorted(lags.values())}, {time.monotonic() - started:.0f}s")


def test_the_count_catches_a_doubled_and_a_skipped_sample():
    """Negative control for ``exactly_once``: one sample trained twice, another never, are both reported."""
    counts = collections.Counter({(epoch, index): 1 for epoch in range(EPOCHS) for index in range(SAMPLES)})
    assert exactly_once(counts) == []
    counts[(1, 7)] += 1
    del counts[(2, 3)]
    assert exactly_once(counts) == ["epoch 1: 0 samples skipped, 1 trained more than once",
                                    "epoch 2: 1 samples skipped, 0 trained more than once"]
