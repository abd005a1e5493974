"""Resuming from checkpoints: the run after a crash is the run without one, optimizer state included.

Workers here push known gradients (``scripted_worker.fixed_gradients``), so the test computes
with ``torch.optim`` what the server must end with, and compares the tensors bit for bit.
"""

from __future__ import annotations

import collections
import logging
import re
import signal

import pytest
import torch

from conftest import wait_for
from paramhub.common.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from paramhub.common.config import Timeouts
from paramhub.common.layout import PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.ledger import Ledger
from paramhub.tools.cluster import LocalCluster
from paramhub.worker.client import PSClient
from scripted_worker import FixedGradientWorker, fixed_gradients

pytestmark = pytest.mark.timeout(180)

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-3
MAX_STEPS, KILL_AT = 10, 4
CLIENT_TIMEOUTS = Timeouts(rpc=10, transfer=30, connect=60, pull_wait=20)


def pull_all(address: str) -> tuple[Layout, list[torch.Tensor], pb.PullHeader]:
    """The server's layout, weights and pull header, read by an observer."""
    with PSClient(address, CLIENT_TIMEOUTS) as reader:
        layout = reader.join("reader", observer=True).layout
        regions = layout.empty_regions()
        header = reader.pull(regions)
    return layout, regions, header


def mean_gradient(layout: Layout, region: int, version: int) -> torch.Tensor:
    """What the server applies for the round at ``version``: the mean of two one-sample pushes."""
    return (fixed_gradients(layout, 0, version)[region] + fixed_gradients(layout, 1, version)[region]) / 2


def reference_sgd(start: torch.Tensor, grads: list[torch.Tensor], fresh_optimizer_at: int | None = None):
    """torch.optim.SGD over ``grads``; ``fresh_optimizer_at``: a new optimizer (no momentum) from that step.

    Returns (weights, momentum buffer).
    """
    param = torch.nn.Parameter(start.clone())

    def optimizer():
        return torch.optim.SGD([param], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True,
                               foreach=False)

    opt = optimizer()
    for step, grad in enumerate(grads):
        if step == fresh_optimizer_at:
            opt = optimizer()
        param.grad = grad.clone()
        opt.step()
    return param.detach(), opt.state[param]["momentum_buffer"]


def test_a_server_killed_mid_round_resumes_to_exactly_the_uninterrupted_run(tmp_path):
    """SIGKILL with one push of round 5 held, resume from the checkpoint of version 4, finish at 10.

    The final weights (pulled, and in the final checkpoint) and the momentum buffer equal
    torch.optim.SGD (Nesterov, weight decay) run over the ten mean gradients without a break.
    Bit for bit: the server sums one-sample pushes into zeros and halves them (exact, as the
    reference's (a + b) / 2), and its SGD step is torch's single-tensor one, op for op, on
    the same CPU. Every version has one push from each of the two workers.
    """
    ckpt = tmp_path / "ckpt"
    args = ("--model", "mlp", "--num-classes", "4", "--workers", "2", "--max-steps", str(MAX_STEPS),
            "--lr", str(LR), "--momentum", str(MOMENTUM), "--nesterov", "--weight-decay", str(WEIGHT_DECAY),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep-checkpoints", "3",
            "--chunk-bytes", "4096", "--linger")  # the default --pull-wait: a restarted server says NOT_FOUND at once
    with LocalCluster(tmp_path / "run") as cluster:
        port = cluster.start_server(*args)
        layout, start, _ = pull_all(cluster.address)
        workers = [FixedGradientWorker(cluster.address, 0, CLIENT_TIMEOUTS),
                   FixedGradientWorker(cluster.address, 1, CLIENT_TIMEOUTS, hold_at=KILL_AT)]
        for worker in workers:
            worker.start()
        with PSClient(cluster.address, CLIENT_TIMEOUTS) as watcher:
            def held_mid_round():  # w1 waits at KILL_AT; w0's push for the next round is in
                status = watcher.status()
                return status.version == KILL_AT and status.round_pushes == 1

            wait_for(held_mid_round, 60, "the run never held mid-round")
        wait_for(checkpoint_path(ckpt, KILL_AT).exists, 30, f"no checkpoint of version {KILL_AT}")
        cluster.kill_server()
        cluster.start_server(*args, "--resume", port=port)
        workers[1].release.set()
        for worker in workers:
            worker.join(timeout=120)
            assert not worker.is_alive(), f"{worker.name} did not finish"
            if worker.error:
                raise worker.error
        _, final, header = pull_all(cluster.address)
        cluster.server.send_signal(signal.SIGTERM)
        assert cluster.server.wait(timeout=60) == 0
        server_log = cluster.read_log("server")

    assert (header.version, header.done) == (MAX_STEPS, True)
    assert re.search(rf"resuming from \S+ckpt-v0*{KILL_AT}\.safetensors at version {KILL_AT}\b", server_log)
    ids = [w.joins[0][0] for w in workers]
    for worker, worker_id in zip(workers, ids):  # one join per server; the second found version 4, not 0
        assert worker.joins == [(worker_id, 0), (worker_id, KILL_AT)]

    (region,) = layout.region_indices(PARAM)  # the mlp: one float32 region, every tensor in it
    assert len(layout.regions) == 1
    grads = [mean_gradient(layout, region, v) for v in range(MAX_STEPS)]
    expected, expected_momentum = reference_sgd(start[region], grads)
    model_state, server_state, meta = load_checkpoint(list_checkpoints(ckpt)[-1])
    assert meta["version"] == MAX_STEPS
    assert torch.equal(final[region], expected)
    assert torch.equal(layout.flatten(model_state)[region], expected)
    assert torch.equal(server_state[f"rule.{layout.regions[region].name}.momentum_buffer"], expected_momentum)
    # negative control: had the resume lost the momentum buffer, the weights would differ
    forgetful, _ = reference_sgd(start[region], grads, fresh_optimizer_at=KILL_AT)
    assert (forgetful - expected).abs().max() > 1e-4

    ledger = Ledger.from_tensors(server_state)
    workers_per_version = collections.defaultdict(list)
    for entry in ledger.entries:
        workers_per_version[entry.version].append(entry.worker_id)
    assert {v: sorted(w) for v, w in workers_per_version.items()} == {v: sorted(ids) for v in range(1, MAX_STEPS + 1)}
    assert len(set(ids)) == 2
    assert dict(ledger.applied_per_worker) == {worker_id: MAX_STEPS for worker_id in ids}


def push_all(client: PSClient, versions: range) -> None:
    """Sole worker of a sync run: each push closes its round."""
    for version in versions:
        reply = client.push(pb.PUSH_KIND_GRADIENT, version, fixed_gradients(client.info.layout, 0, version),
                            num_samples=1, loss=0.0)
        assert reply.next_version == version + 1


def test_adamw_moments_and_step_survive_a_checkpoint_and_resume(tmp_path, start_server, connect):
    """3 AdamW steps, a checkpoint, a resumed server, 2 more: the moments, the step count and the
    weights equal torch.optim.AdamW over the 5 gradients (to float rounding: our step computes the
    decay and the bias corrections with the same formulas but not always the same kernels)."""
    settings = dict(optimizer="adamw", lr=0.01, weight_decay=0.1, checkpoint_dir=str(tmp_path / "ckpt"))
    first = start_server(**settings)
    client = connect(first.port)
    layout = client.join("w").layout
    (region,) = layout.region_indices(PARAM)
    start = first.store.snapshot().regions[region].clone()
    push_all(client, range(3))
    first.checkpoint()
    saved = first.store.rule_state_copy()[region]
    first.shutdown(grace=0)

    resumed = start_server(**settings, resume=True)
    assert resumed.store.version == 3
    restored = resumed.store.rule_state_copy()[region]
    assert set(restored) == {"exp_avg", "exp_avg_sq", "step"}
    assert all(torch.equal(restored[k], saved[k]) for k in saved) and int(restored["step"]) == 3
    client = connect(resumed.port)
    client.join("w")
    push_all(client, range(3, 5))

    grads = [fixed_gradients(layout, 0, v)[region] for v in range(5)]

    def reference(fresh_optimizer_at=None):
        param = torch.nn.Parameter(start.clone())
        opt = None
        for step, grad in enumerate(grads):
            if opt is None or step == fresh_optimizer_at:
                opt = torch.optim.AdamW([param], lr=0.01, weight_decay=0.1, foreach=False)
            param.grad = grad.clone()
            opt.step()
        return param.detach(), opt.state[param]

    expected, expected_state = reference()
    state = resumed.store.rule_state_copy()[region]
    tight = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.store.snapshot().regions[region], expected, **tight)
    torch.testing.assert_close(state["exp_avg"], expected_state["exp_avg"], **tight)
    torch.testing.assert_close(state["exp_avg_sq"], expected_state["exp_avg_sq"], **tight)
    assert int(state["step"]) == int(expected_state["step"]) == 5
    forgetful, _ = reference(fresh_optimizer_at=3)  # negative control: moments and step lost at the resume
    assert (forgetful - expected).abs().max() > 1e-4


def test_a_checkpoint_of_another_model_is_refused(tmp_path, start_server, connect, caplog):
    """A newer checkpoint of a 5-class mlp beside ours (4 classes): reported and skipped, ours is used;
    with only the other model's checkpoint, the server starts from scratch."""
    caplog.set_level(logging.INFO, logger="paramhub.ps")
    ckpt, foreign_only = tmp_path / "ckpt", tmp_path / "foreign-only"
    ours = start_server(checkpoint_dir=str(ckpt), lr=0.5)
    client = connect(ours.port)
    client.join("w")
    push_all(client, range(2))
    ours.checkpoint()
    ours_v2 = ours.store.snapshot().regions[0].clone()
    fresh = start_server().store.snapshot().regions[0].clone()
    for directory in (ckpt, foreign_only):
        other = start_server(checkpoint_dir=str(directory), num_classes=5, lr=0.5)
        client = connect(other.port)
        client.join("w")
        push_all(client, range(3))
        other.checkpoint()  # version 3: newer than ours
    assert [p.name for p in list_checkpoints(ckpt)] == ["ckpt-v000000002.safetensors", "ckpt-v000000003.safetensors"]

    resumed = start_server(checkpoint_dir=str(ckpt), resume=True)
    assert resumed.store.version == 2
    assert torch.equal(resumed.store.snapshot().regions[0], ours_v2)
    assert re.search(r"skipping checkpoint: \S+ckpt-v000000003\.safetensors holds a different model "
                     r"\(mlp, 5 classes, .*\) than this server's \(mlp, 4 classes", caplog.text), caplog.text
    assert re.search(r"resuming from \S+ckpt-v000000002\.safetensors at version 2", caplog.text)

    caplog.clear()
    scratch = start_server(checkpoint_dir=str(foreign_only), resume=True)
    assert scratch.store.version == 0
    assert torch.equal(scratch.store.snapshot().regions[0], fresh)
    assert "skipping checkpoint" in caplog.text and "no usable checkpoint" in caplog.text
