"""Torch CPU threads by default: CPUs available ÷ local paramhub processes (common/runtime.py).

The arithmetic is checked on its inputs; the /proc scan and the cgroup reading on
fake trees in a tmp dir; the re-check on a fake clock and a fake set_num_threads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from paramhub.common import runtime
from paramhub.common.runtime import (ThreadChoice, ThreadRecheck, cgroup_cpu_limit, choose_threads,
                                     count_local_paramhub_processes, is_paramhub_command, local_paramhub_pids)


# -- the arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, peers, expected", [
    (2, 3, 1),    # fewer CPUs than processes: still one thread each
    (16, 4, 4),
    (16, 3, 5),   # rounded down: 3 x 5 <= 16
    (2, 1, 2),
    (1.5, 1, 1),  # a quota of 1.5 CPUs
    (8, 0, 8),    # a scan that found nobody (no /proc): this process alone
])
def test_auto_divides_the_cpus_by_the_local_processes(cpus, peers, expected):
    choice = choose_threads(0, cpus, peers, env={})
    assert (choice.threads, choice.source) == (expected, "auto")


def test_local_world_size_replaces_the_counted_processes():
    choice = choose_threads(0, 16, 1, env={"LOCAL_WORLD_SIZE": "4"})
    assert (choice.threads, choice.peers, choice.peers_from) == (4, 4, "LOCAL_WORLD_SIZE")
    assert "LOCAL_WORLD_SIZE=4" in choice.describe()


def test_a_malformed_local_world_size_is_ignored():
    assert choose_threads(0, 16, 2, env={"LOCAL_WORLD_SIZE": "four"}).threads == 8


def test_omp_num_threads_wins_over_auto():
    choice = choose_threads(0, 16, 4, env={"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"})
    assert (choice.threads, choice.source) == (3, "OMP_NUM_THREADS")


def test_an_empty_omp_num_threads_is_ignored():
    assert choose_threads(0, 16, 4, env={"OMP_NUM_THREADS": ""}).threads == 4


def test_explicit_threads_win_over_everything():
    choice = choose_threads(7, 2, 3, env={"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"})
    assert (choice.threads, choice.source) == (7, "explicit")


def test_the_log_line_names_the_inputs():
    assert choose_threads(0, 2, 2, env={}).describe() == "torch threads: 1 (2 CPUs, 2 local paramhub processes)"
    assert (choose_threads(0, 1.5, 1, env={}, quota=True).describe()
            == "torch threads: 1 (1.5 CPUs by cgroup quota, 1 local paramhub process)")


# -- which command lines are paramhub processes ---------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["ps-worker", "--shard", "0"],
    ["/usr/bin/python3", "/usr/local/bin/ps-worker", "--shard", "0"],  # as a shebang runs the console script
    ["/venv/bin/python3.11", "/venv/bin/ps-server", "--workers", "2"],
    ["python", "-m", "paramhub.worker.cli", "--shard", "1"],
    ["python3", "-u", "-X", "dev", "-m", "paramhub.worker.eval_cli"],
    ["python", "-mparamhub.ps.cli"],
])
def test_paramhub_command_lines_are_recognised(argv):
    assert is_paramhub_command(argv)


@pytest.mark.parametrize("argv", [
    ["python", "-m", "pytest", "tests/test_threads.py"],
    ["python", "train.py", "--name", "ps-worker"],
    ["grep", "ps-worker"],
    ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()", "--multiprocessing-fork"],
    ["python", "-m", "paramhub.tools.ctl", "status"],
    [],
])
def test_other_command_lines_are_not(argv):
    assert not is_paramhub_command(argv)


def fake_process(proc, pid: int, argv: list[str], ppid: int = 1, comm: str = "python") -> None:
    directory = proc / str(pid)
    directory.mkdir()
    (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))
    (directory / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")


def test_the_scan_counts_paramhub_processes_and_nothing_else(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    fake_process(proc, 100, ["/usr/bin/python3", "/usr/local/bin/ps-server", "--workers", "2"])
    fake_process(proc, 101, ["/usr/bin/python3", "/usr/local/bin/ps-worker", "--shard", "0"])
    fake_process(proc, 102, ["python", "-m", "paramhub.worker.cli", "--shard", "1"], comm="py (worker) x")
    # negative controls: another python program, a shell, a zombie, files that are not processes
    fake_process(proc, 200, ["python", "-m", "pytest", "-q", "tests/"])
    fake_process(proc, 201, ["bash", "-c", "ps-worker --shard 3"])
    fake_process(proc, 202, [])
    (proc / "self").mkdir()
    (proc / "cpuinfo").write_text("")
    assert count_local_paramhub_processes(proc) == 3


def test_forked_children_of_a_paramhub_process_are_not_peers(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    worker = ["/usr/bin/python3", "/usr/local/bin/ps-worker", "--loader-workers", "2"]
    fake_process(proc, 300, worker)
    fake_process(proc, 301, worker, ppid=300)  # DataLoader workers: the same cmdline, forked
    fake_process(proc, 302, worker, ppid=300)
    fake_process(proc, 400, worker, ppid=50)  # another worker started from a shell
    assert count_local_paramhub_processes(proc) == 2


def test_an_unreadable_proc_counts_nobody(tmp_path):
    assert count_local_paramhub_processes(tmp_path / "missing") == 0


def test_the_real_proc_scan_finds_a_live_paramhub_process_and_not_another(tmp_path):
    """Against this machine's /proc: ``python .../ps-worker`` (as its shebang runs it) counts,
    a plain ``python -c`` sleeping beside it does not."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    script = tmp_path / "ps-worker"
    script.write_text("import sys, time\nsys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, str(script), "--shard", "0"], stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        assert worker.stdout.readline() == b"up\n" and other.stdout.readline() == b"up\n"
        pids = local_paramhub_pids()
        assert worker.pid in pids
        assert other.pid not in pids
        assert os.getpid() not in pids  # pytest is no paramhub process
    finally:
        for child in (worker, other):
            child.kill()
            child.wait()


# -- cgroup quotas -------------------------------------------------------------------------------------------


def fake_cgroup(tmp_path, self_cgroup: str) -> tuple:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(self_cgroup)
    root = tmp_path / "cgroup"
    root.mkdir()
    return proc, root


def test_cgroup_v2_max_is_no_quota(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/\n")
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc, root) is None


def test_cgroup_v2_quota_in_the_process_own_cgroup(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/kubepods/pod1/ctr\n")
    (root / "cpu.max").write_text("max 100000\n")
    own = root / "kubepods" / "pod1" / "ctr"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(1.5)


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/a/b\n")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("200000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("300000 100000\n")  # the child asks for more than its parent allows
    assert cgroup_cpu_limit(proc, root) == pytest.approx(2.0)
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(2.0)


def test_cgroup_v2_path_not_mounted_falls_back_to_the_mount_root(tmp_path):
    proc, root = fake_cgroup(tmp_path, "0::/host/path/not/here\n")  # a container sees its own root only
    (root / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(0.5)


def test_cgroup_v1_quota(tmp_path):
    proc, root = fake_cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    own = root / "cpu,cpuacct" / "docker" / "abc"
    own.mkdir(parents=True)
    (own / "cpu.cfs_quota_us").write_text("300000\n")
    (own / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(3.0)


def test_cgroup_v1_minus_one_is_no_quota(tmp_path):
    proc, root = fake_cgroup(tmp_path, "1:cpu:/\n")
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(proc, root) is None


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none") is None


def test_available_cpus_is_capped_by_the_quota(tmp_path, monkeypatch):
    proc, root = fake_cgroup(tmp_path, "0::/\n")
    (root / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert runtime.available_cpus(proc, root) == (1.5, True)
    (root / "cpu.max").write_text("800000 100000\n")  # a quota above the affinity mask changes nothing
    assert runtime.available_cpus(proc, root) == (4.0, False)


# -- re-checking while training ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_recheck_sets_threads_only_when_the_answer_changes(caplog):
    clock, answers, decided, applied = FakeClock(), [2, 2, 1, 1], [], []

    def decide() -> ThreadChoice:
        decided.append(clock.now)
        return ThreadChoice(answers.pop(0), "auto", cpus=2, peers=1)

    recheck = ThreadRecheck(2, decide, applied.append, interval_s=5.0, clock=clock,
                            logger=logging.getLogger("test.threads"), prefix="[worker 0] ")
    with caplog.at_level(logging.INFO, logger="test.threads"):
        recheck()  # before the interval: no re-count at all
        assert decided == []
        for now in (5.0, 6.0, 10.0, 15.0, 20.0):
            clock.now = now
            recheck()
    assert decided == [5.0, 10.0, 15.0, 20.0]  # 6.0 was inside the interval
    assert applied == [1]  # 2, 2: unchanged; then 1, once; 1 again: unchanged
    assert recheck.current == 1
    changes = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert changes == ["[worker 0] torch threads: 1 (2 CPUs, 1 local paramhub process), was 2"]


def test_recheck_threads_is_a_no_op_until_configured(monkeypatch):
    monkeypatch.setattr(runtime, "_recheck", None)
    runtime.recheck_threads()  # nothing installed: nothing happens, nothing raises
    calls = []
    monkeypatch.setattr(runtime, "_recheck", lambda: calls.append(1))
    runtime.recheck_threads()
    assert calls == [1]


@pytest.mark.parametrize("explicit, env, rechecks",
                         [(0, {}, True), (3, {}, False), (0, {"OMP_NUM_THREADS": "2"}, False)])
def test_configure_installs_the_recheck_only_for_auto(explicit, env, rechecks, monkeypatch):
    import torch

    monkeypatch.setattr(runtime, "_recheck", None)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    choice = runtime.configure_torch_threads(explicit, logging.getLogger("test.threads"), recheck=True)
    assert applied == [choice.threads]
    assert (runtime._recheck is not None) == rechecks
