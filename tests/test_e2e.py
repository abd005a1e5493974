"""End-to-end tests of the real console scripts, as separate processes."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torchvision
from click.testing import CliRunner

from paramhub.common.checkpoint import list_checkpoints, load_checkpoint, load_model_state
from paramhub.tools.cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_server_and_two_workers_train_to_completion_and_checkpoint_loads_into_torchvision(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server("--model", "resnet18", "--num-classes", "5", "--workers", "2", "--max-steps", "6",
                             "--lr", "0.02", "--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", "3")
        for shard in (0, 1):
            cluster.start_worker(shard, "--image-size", "32", "--batch-size", "8", "--synthetic-size", "256",
                                 "--log-every", "1", "--connect-timeout", "30")
        codes = cluster.wait(timeout=240)
        logs = {name: cluster.read_log(name) for name in codes}
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, logs
    assert "run complete" in logs["server"]
    assert "[worker 0/2] done after" in logs["worker0"]
    versions = [int(p.name[6:15]) for p in list_checkpoints(ckpt_dir)]
    assert versions == [3, 6]
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict(load_model_state(list_checkpoints(ckpt_dir)[-1]), strict=True)
    _, server_state, meta = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
    assert meta["version"] == 6 and meta["model"] == "resnet18"
    assert any("momentum_buffer" in key for key in server_state)
    assert int(model.bn1.num_batches_tracked) == 6  # BatchNorm state travelled and was averaged
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_async_averaging_run_with_a_staleness_bound_completes(tmp_path):
    with LocalCluster(tmp_path / "run") as cluster:
        # enough versions that the second worker surely joins before the first could finish alone
        cluster.start_server("--model", "mlp", "--num-classes", "4", "--workers", "2", "--max-steps", "60",
                             "--mode", "async", "--update", "avg", "--local-steps", "2", "--staleness", "1",
                             "--outer-optimizer", "nesterov", "--checkpoint-dir", str(tmp_path / "ckpt"))
        for shard in (0, 1):
            cluster.start_worker(shard, "--image-size", "8", "--batch-size", "8", "--synthetic-size", "256")
        codes = cluster.wait(timeout=120)
        logs = {name: cluster.read_log(name) for name in codes}
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, logs
    assert "async/avg" in logs["worker0"]
    _, server_state, meta = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[-1])
    assert meta["version"] == 60 and any("momentum_buffer" in key for key in server_state)
    assert "[worker 1/2] done after" in logs["worker1"]


def test_worker_gives_up_on_a_missing_server_naming_the_address():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "paramhub.worker.cli", "--server", f"127.0.0.1:{port}", "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "unreachable" in result.stderr


BAD_FLAGS = [
    (["paramhub.ps.cli", "--mode", "bogus"], "Invalid value for '--mode'"),
    (["paramhub.ps.cli", "--workers", "2", "--backup-workers", "2"], "--backup-workers"),
    (["paramhub.ps.cli", "--chunk-bytes", "100"], "Invalid value for '--chunk-bytes'"),
    (["paramhub.worker.cli", "--server", "no-port"], "expected host:port"),
    (["paramhub.worker.cli", "--shard", "3", "--num-shards", "2"], "--shard"),
]


@pytest.mark.parametrize("argv, message", [BAD_FLAGS[0], BAD_FLAGS[3]], ids=["ps.cli", "worker.cli"])
def test_each_script_exits_with_a_usage_error_on_a_bad_flag(argv, message):
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_bad_flags_get_a_usage_error(argv, message):
    """Every bad flag in-process: the scripts' own click commands, standalone as a process runs them (exit 2 and
    the message); a process per flag costs seconds of imports each, and the test above runs each script so."""
    result = CliRunner().invoke(importlib.import_module(argv[0]).main, argv[1:])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
