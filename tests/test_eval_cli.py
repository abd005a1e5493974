"""ps-eval: the observer loop against an in-process server, and the real console script against a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from conftest import fast_timeouts, wait_for

from paramhub.common.checkpoint import load_checkpoint
from paramhub.common.evaluation import evaluate, evaluation_dataset
from paramhub.common.models import build_model
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.tools.cluster import LocalCluster
from paramhub.worker.eval_cli import main
from paramhub.worker.evaluator import EvalConfig, Evaluator
from paramhub.worker.client import PSClient

pytestmark = pytest.mark.timeout(120)
RECORD_KEYS = {"version", "top1", "top5", "loss", "time", "samples"}
EVAL_ARGS = ["--data", "synthetic", "--image-size", "8", "--eval-size", "48", "--batch-size", "16"]


def expected_metrics(model, size: int = 48):
    data = evaluation_dataset("synthetic", num_classes=model.fc.out_features, image_size=8, size=size)
    return evaluate(model, DataLoader(data, batch_size=16), "cpu")


class EvaluatorThread:
    """Runs an Evaluator on a thread; ``join`` re-raises what it raised."""

    def __init__(self, port: int, tmp_path, every: float | None):
        config = EvalConfig(server=f"127.0.0.1:{port}", data="synthetic", image_size=8, every=every, eval_size=48,
                            batch_size=16, out=str(tmp_path / "metrics.jsonl"), checkpoint_dir=str(tmp_path / "best"),
                            timeouts=fast_timeouts())
        self.client = PSClient(config.server, config.timeouts)
        self.evaluator = Evaluator(config, self.client)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.evaluator.run()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self, timeout: float) -> list[dict]:
        self.thread.join(timeout)
        self.client.close()
        assert not self.thread.is_alive(), "the evaluator did not finish"
        if self.error is not None:
            raise self.error
        return self.evaluator.records


def train_steps(client: PSClient, steps: int, seed: int = 0) -> None:
    """Pushes random gradients, one version per push (a one-worker sync server)."""
    gen = torch.Generator().manual_seed(seed)
    layout = client.info.layout
    regions = layout.empty_regions()
    version = client.pull(regions).version
    for _ in range(steps):
        grads = [torch.randn(r.shape, generator=gen) if r.dtype.is_floating_point else torch.zeros_like(r)
                 for r in regions]
        reply = client.push(pb.PUSH_KIND_GRADIENT, version, grads, num_samples=8, loss=1.0)
        version = reply.version


def test_once_evaluates_the_servers_model_keeps_it_and_is_no_worker(start_server, connect, tmp_path):
    server = start_server(model="mlp", num_classes=4, seed=3)
    trainer = connect(server.port)
    trainer.join("w0", shard=0)
    out, best_dir = tmp_path / "metrics.jsonl", tmp_path / "best"
    result = CliRunner().invoke(main, ["--server", f"127.0.0.1:{server.port}", "--once", "--out", str(out),
                                       "--checkpoint-dir", str(best_dir), "--connect-timeout", "5", *EVAL_ARGS])
    assert result.exit_code == 0, result.output

    lines = out.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == RECORD_KEYS
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record  # printed too
    model = build_model("mlp", 4, seed=3)
    expected = expected_metrics(model)
    assert (record["version"], record["samples"], record["top1"], record["top5"]) == (0, 48, expected.top1,
                                                                                      expected.top5)
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)

    state, server_state, meta = load_checkpoint(best_dir / "best.safetensors")
    assert server_state == {} and set(state) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert (meta["version"], meta["model"], meta["num_classes"]) == (0, "mlp", 4)
    best = json.loads((best_dir / "best.json").read_text())
    assert {key: best[key] for key in RECORD_KEYS} == record and best["layout_hash"] == trainer.info.layout.hash

    status = trainer.status()
    assert [w.worker_name for w in status.workers] == ["w0"]  # the observer is not a worker


def test_every_follows_new_versions_until_the_run_is_done(start_server, connect, tmp_path):
    server = start_server(model="mlp", num_classes=4, max_steps=4)
    evaluator = EvaluatorThread(server.port, tmp_path, every=0.0)
    wait_for(lambda: evaluator.evaluator.records, what="the first evaluation")
    trainer = connect(server.port)
    trainer.join("w0", shard=0)
    train_steps(trainer, 4)
    records = evaluator.join(timeout=60)

    versions = [r["version"] for r in records]
    assert versions[0] == 0 and versions[-1] == 4 and versions == sorted(set(versions))
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records
    best_record = records[0]
    for record in records[1:]:
        if (record["top1"], -record["loss"]) > (best_record["top1"], -best_record["loss"]):
            best_record = record
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["version"] == best_record["version"]
    assert load_checkpoint(tmp_path / "best" / "best.safetensors")[2]["version"] == best_record["version"]


def test_a_long_every_still_evaluates_the_final_version_as_soon_as_the_run_is_done(start_server, connect, tmp_path):
    server = start_server(model="mlp", num_classes=4, max_steps=3)
    evaluator = EvaluatorThread(server.port, tmp_path, every=600.0)
    wait_for(lambda: evaluator.evaluator.records, what="the first evaluation")
    trainer = connect(server.port)
    trainer.join("w0", shard=0)
    train_steps(trainer, 3)
    started = time.monotonic()
    records = evaluator.join(timeout=30)
    assert time.monotonic() - started < 30
    assert [r["version"] for r in records] == [0, 3]  # nothing in between: at most one evaluation per --every


def test_best_model_of_an_earlier_evaluator_is_the_bar_to_beat(start_server, tmp_path):
    server = start_server(model="mlp", num_classes=4, seed=3)
    best_json = tmp_path / "best" / "best.json"
    assert EvaluatorThread(server.port, tmp_path, every=None).join(timeout=30)[0]["version"] == 0
    saved = json.loads(best_json.read_text())
    saved["top1"] = 2.0  # unbeatable: a second evaluator of the same model must keep it
    best_json.write_text(json.dumps(saved))
    EvaluatorThread(server.port, tmp_path, every=None).join(timeout=30)
    assert json.loads(best_json.read_text())["top1"] == 2.0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_frozen_backbone_runs_are_evaluated_with_the_frozen_tensors(start_server, tmp_path):
    server = start_server(model="mlp", num_classes=4, seed=5, freeze_backbone=True)
    records = EvaluatorThread(server.port, tmp_path, every=None).join(timeout=30)
    model = build_model("mlp", 4, seed=5)
    assert records[0]["top1"] == expected_metrics(model).top1
    state = load_checkpoint(tmp_path / "best" / "best.safetensors")[0]
    torch.testing.assert_close(state["hidden.weight"], model.hidden.weight.detach(), rtol=0, atol=0)


def test_precise_bn_scores_each_version_before_and_after_recomputing_and_keeps_the_recomputed_model(
        start_server, tmp_path):
    from test_precise_bn import write_image_folder

    from paramhub.common.evaluation import PreciseBN

    write_image_folder(tmp_path / "train", classes=3, per_class=8)
    write_image_folder(tmp_path / "val", classes=3, per_class=3)
    server = start_server(model="resnet18", num_classes=3, seed=6)
    out, best_dir = tmp_path / "metrics.jsonl", tmp_path / "best"
    result = CliRunner().invoke(main, ["--server", f"127.0.0.1:{server.port}", "--once", "--out", str(out),
                                       "--checkpoint-dir", str(best_dir), "--connect-timeout", "5",
                                       "--data", str(tmp_path / "val"), "--image-size", "16", "--batch-size", "6",
                                       "--precise-bn-data", str(tmp_path / "train"), "--precise-bn-batches", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert set(record) == RECORD_KEYS | {"top1_running_stats"}

    model = build_model("resnet18", 3, seed=6)  # the server's model, scored here independently
    val = DataLoader(evaluation_dataset(tmp_path / "val", num_classes=3, image_size=16), batch_size=6)
    assert record["top1_running_stats"] == evaluate(model, val, "cpu").top1
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    PreciseBN(tmp_path / "train", num_classes=3, image_size=16, batch_size=6, num_batches=3).apply(model, "cpu")
    expected = evaluate(model, val, "cpu")
    assert (record["top1"], record["samples"]) == (expected.top1, 9)
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)

    state = load_checkpoint(best_dir / "best.safetensors")[0]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-7)  # the recomputed statistics
    for name, weight in weights.items():
        assert torch.equal(state[name], weight), name  # bit-identical weights
    assert json.loads((best_dir / "best.json").read_text())["top1_running_stats"] == record["top1_running_stats"]


def test_bad_precise_bn_data_exits_1_with_a_clear_message(start_server, tmp_path, caplog):
    from test_precise_bn import write_image_folder

    write_image_folder(tmp_path / "five", classes=5, per_class=2)
    server = start_server(model="resnet18", num_classes=3)
    for source, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "five", "has 5 classes but")]:
        caplog.clear()
        result = CliRunner().invoke(main, ["--server", f"127.0.0.1:{server.port}", "--once", "--connect-timeout", "5",
                                           *EVAL_ARGS, "--precise-bn-data", str(source)])
        assert result.exit_code == 1 and message in caplog.text, caplog.text


def test_once_and_every_exclude_each_other():
    result = CliRunner().invoke(main, ["--once", "--every", "5", "--data", "synthetic"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_ps_eval_once_against_a_real_server_process(tmp_path):
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server("--model", "mlp", "--num-classes", "4")
        result = subprocess.run(
            [sys.executable, "-m", "paramhub.worker.eval_cli", "--server", cluster.address, "--once",
             "--out", str(tmp_path / "metrics.jsonl"), "--checkpoint-dir", str(tmp_path / "best"),
             "--connect-timeout", "30", *EVAL_ARGS],
            capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr
        with PSClient(cluster.address, fast_timeouts()) as client:
            assert list(client.status().workers) == []
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert set(record) == RECORD_KEYS and record["version"] == 0 and record["samples"] == 48
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record
    state, _, meta = load_checkpoint(tmp_path / "best" / "best.safetensors")
    assert meta["model"] == "mlp" and set(state) == set(build_model("mlp", 4).state_dict())
    assert "observer" in cluster.read_log("server")


def test_ps_eval_against_a_missing_server_exits_2_naming_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "paramhub.worker.eval_cli", "--server", f"127.0.0.1:{port}", "--data", "synthetic",
         "--once", "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "unreachable" in result.stderr


def test_a_slow_evaluation_still_gets_the_final_version_of_a_server_that_has_exited(start_server, connect, tmp_path,
                                                                                     monkeypatch):
    """The server exits seconds after the run is done; an evaluation can take longer than that."""
    import paramhub.worker.evaluator as evaluator_module

    evaluating, release = threading.Event(), threading.Event()

    def slow_evaluate(model, loader, device):
        evaluating.set()
        release.wait(30)
        return evaluate(model, loader, device)

    monkeypatch.setattr(evaluator_module, "evaluate", slow_evaluate)
    server = start_server(model="mlp", num_classes=4, max_steps=2, done_grace_s=0.1)
    serving = threading.Thread(target=server.run_until_done, daemon=True)
    serving.start()
    evaluator = EvaluatorThread(server.port, tmp_path, every=0.0)
    assert evaluating.wait(30)  # busy with version 0 ...
    trainer = connect(server.port)
    trainer.join("w0", shard=0)
    train_steps(trainer, 2)
    trainer.leave()
    serving.join(30)
    assert not serving.is_alive()  # ... while the run ends and the server goes away
    release.set()
    records = evaluator.join(timeout=30)
    assert [r["version"] for r in records] == [0, 2]
