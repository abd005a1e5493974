"""What a run shows people: the worker's tqdm bar on a terminal, ps-eval's TensorBoard scalars."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest
from click.testing import CliRunner

from conftest import fast_timeouts
from paramhub.common.config import WorkerConfig
from paramhub.worker.eval_cli import main as eval_main
from paramhub.worker.trainer import Progress, Trainer

pytestmark = pytest.mark.timeout(120)
EVAL_ARGS = ["--data", "synthetic", "--image-size", "8", "--eval-size", "48", "--batch-size", "16",
             "--connect-timeout", "5"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_bar_is_off_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress("[worker 0/2]") as progress:
        progress.update(32, 1, 1, 2.0)
    assert not progress.enabled and sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert Progress("[worker 0/2]").enabled


def test_a_worker_on_a_terminal_shows_step_version_loss_and_samples_per_second(start_server, connect, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    server = start_server(model="mlp", num_classes=4, workers=1, max_steps=5)
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", batch_size=8, image_size=8, synthetic_size=64,
                          log_every=0, timeouts=fast_timeouts())
    summary = Trainer(config, connect(server.port)).run()
    assert summary.steps == 5
    shown = terminal.getvalue()
    assert "[worker 0/1]" in shown and "samples/s" in shown
    last = shown.rsplit("\r", 1)[-1]  # the bar's final state
    assert "40.0 samples" in last and "step=5" in last and "version=5" in last
    assert f"loss={summary.losses[-1]:.4f}" in last


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (an optional extra: pip install 'paramhub[tensorboard]')")
def test_ps_eval_writes_top1_top5_loss_by_version_as_tensorboard_scalars(start_server, connect, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    server = start_server(model="mlp", num_classes=4, seed=3)
    connect(server.port).join("w0", shard=0)  # a run with a worker, at version 0
    board = tmp_path / "tb"
    result = CliRunner().invoke(eval_main, ["--server", f"127.0.0.1:{server.port}", "--once", "--tensorboard",
                                            str(board), *EVAL_ARGS])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(board))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"eval/top1", "eval/top5", "eval/loss"}
    record = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("top1", "top5", "loss"):
        (scalar,) = events.Scalars(f"eval/{key}")
        assert scalar.step == record["version"] == 0
        assert scalar.value == pytest.approx(record[key], rel=1e-6)


def test_tensorboard_without_the_package_is_a_clear_error_before_connecting(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    # Port 9 on loopback: nothing listens, and the error must come before any attempt to connect.
    result = CliRunner().invoke(eval_main, ["--server", "127.0.0.1:9", "--once", "--tensorboard", str(tmp_path),
                                            *EVAL_ARGS])
    assert result.exit_code == 2
    assert "--tensorboard" in result.output and "pip install tensorboard" in result.output
