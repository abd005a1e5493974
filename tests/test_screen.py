"""Screening: no push poisons the model, no published version or checkpoint is non-finite, and
robust clipping keeps a poisoning worker among honest ones from steering the model."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from paramhub.common import checkpoint, codec
from paramhub.common.layout import PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.consistency import AsyncEngine, StagedPush, SyncRounds
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.rules import SGDRule
from paramhub.ps.screen import MAX_SAMPLES_PER_PUSH, NormClip, UpdateScreen, update_norm
from paramhub.ps.store import ParameterStore

pytestmark = pytest.mark.timeout(120)
GRAD = pb.PUSH_KIND_GRADIENT


def pulled(client) -> list[torch.Tensor]:
    regions = client.info.layout.empty_regions()
    client.pull(regions)
    return regions


# -- layer 1: bounds on every push ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_are_checked_for_finiteness_and_magnitude(dtype):
    ok = torch.tensor([1.0, -2.0, 3.0], dtype=dtype)
    codec.check_values(ok, max_abs=3.0)
    codec.check_values(ok)  # no bound: finiteness only
    for bad, words in [([1.0, math.nan], "NaN"), ([math.inf, 0.0], "NaN or infinite"), ([-4.0, 1.0], "above")]:
        with pytest.raises(codec.MalformedMessage, match=words):
            codec.check_values(torch.tensor(bad, dtype=dtype), max_abs=3.0)
    codec.check_values(torch.tensor([-4.0, 1.0], dtype=dtype))  # the control: without a bound -4 passes
    codec.check_values(torch.tensor([2**40], dtype=torch.int64), max_abs=3.0)  # integers are counts, not updates


def test_two_pushes_of_huge_finite_gradients_are_refused_and_change_nothing(start_server, connect):
    """The hole: two pushes of 3e38 overflowed the mean, and every weight became inf."""
    server = start_server(workers=2, lr=0.1)
    a, b = connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    before = [t.clone() for t in pulled(a)]
    huge = [torch.full_like(before[0], 3e38)]
    for client in (a, b):
        with pytest.raises(grpc.RpcError) as info:
            client.push(GRAD, 0, huge, num_samples=1, loss=1.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-update-abs" in info.value.details()
    assert server.store.version == 0 and server.store.failure is None
    assert torch.equal(pulled(a)[0], before[0])
    # honest pushes go on as before
    a.push(GRAD, 0, [torch.ones_like(before[0])], num_samples=1, loss=1.0)
    b.push(GRAD, 0, [torch.ones_like(before[0])], num_samples=1, loss=1.0)
    torch.testing.assert_close(pulled(a)[0], before[0] - 0.1)


def test_a_push_claiming_absurd_sample_counts_is_refused(start_server, connect):
    server = start_server()
    client = connect(server.port)
    client.join("a")
    w = pulled(client)[0]
    with pytest.raises(grpc.RpcError) as info:
        client.push(GRAD, 0, [torch.ones_like(w)], num_samples=MAX_SAMPLES_PER_PUSH + 1, loss=1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.push(GRAD, 0, [torch.ones_like(w)], num_samples=MAX_SAMPLES_PER_PUSH, loss=1.0)  # the bound itself is fine
    assert server.store.version == 1


# -- layer 2: no non-finite version is published ------------------------------------------------

def test_without_the_value_bound_the_overflow_is_caught_before_it_is_published(start_server, connect, tmp_path):
    """Negative control of the bound above, and the second layer: the same attack with the bound opened up
    overflows the sums, and the engine refuses to publish the result: the run stops as failed."""
    server = start_server(workers=2, lr=0.1, max_update_abs=3.4e38, checkpoint_dir=str(tmp_path))
    a, b = connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    before = pulled(a)[0].clone()
    huge = [torch.full_like(before, 3e38)]
    a.push(GRAD, 0, huge, num_samples=1, loss=1.0)  # accepted into the round: the bound is open
    reply = b.push(GRAD, 0, huge, num_samples=1, loss=1.0)
    assert reply.done and server.store.version == 0
    assert "non-finite" in server.store.failure
    assert torch.equal(pulled(a)[0], before)  # the published weights are the last finite ones
    assert server.checkpoint() is None and not checkpoint.list_checkpoints(str(tmp_path))


def test_a_diverging_configuration_stops_the_run_with_finite_weights_and_checkpoints(start_server, connect, tmp_path):
    """lr x weight decay = 10: each step multiplies the weights by -9, with gradients of zero. Every
    checkpoint written on the way holds finite weights and momentum; the run stops and says why."""
    server = start_server(lr=10.0, weight_decay=1.0, momentum=0.5, checkpoint_dir=str(tmp_path),
                          checkpoint_every=1, keep_checkpoints=100)
    client = connect(server.port)
    client.join("a")
    w = pulled(client)[0]
    zero = [torch.zeros_like(w)]
    version = 0
    for _ in range(200):
        reply = client.push(GRAD, version, zero, num_samples=1, loss=1.0)
        if reply.done:
            break
        version = reply.version
        server.checkpoint()
    assert reply.done and server.store.failure, "the weights grew without bound and nothing stopped them"
    assert 10 < server.store.version < 200
    assert codec.finite(pulled(client)[0])
    paths = checkpoint.list_checkpoints(str(tmp_path))
    assert len(paths) == server.store.version
    for path in paths:
        model_state, server_state, _ = checkpoint.load_checkpoint(path)
        assert all(codec.finite(t) for t in [*model_state.values(), *server_state.values()])
    assert server.checkpoint() is None


# -- layer 3: robust clipping -------------------------------------------------------------------

def test_the_clip_scales_pushes_above_k_times_the_median_norm_and_caps_claimed_samples():
    clip = NormClip(factor=2.0, window=5, min_history=3)
    assert clip.weigh(1.0, 32).clip == 1.0  # warm-up: nothing to compare with
    assert clip.weigh(1.2, 32).clip == 1.0
    assert clip.weigh(0.8, 32).clip == 1.0  # honest pushes: never scaled, never scaled up
    attack = clip.weigh(1000.0, 10**6)  # window 1, 1.2, 0.8, 1000: median 1.1
    assert attack.clip == pytest.approx(2.0 * 1.1 / 1000.0)
    assert attack.num_samples == 32
    with pytest.raises(ValueError):
        NormClip(factor=0.0)


def test_update_norm_counts_dense_and_sparse_pieces_of_the_param_regions_only():
    pieces = [codec.Piece(0, torch.tensor([3.0, 0.0])), codec.Piece(0, torch.tensor([4.0]), indices=torch.tensor([1])),
              codec.Piece(1, torch.tensor([100.0]))]
    assert update_norm(pieces, {0}) == pytest.approx(5.0)


def _quadratic_run(clip: NormClip | None, mode: str, versions: int = 40) -> float:
    """3 honest workers push the gradient of |w - target|^2 / 2 (plus noise); a fourth pushes a poisoned
    update 50x as large, in the opposite direction, claiming 100x the samples. Returns |w - target|."""
    layout = Layout.from_state({"w": torch.zeros(64)}, param_names={"w"})
    target = torch.linspace(-1, 1, 64)
    store = ParameterStore(layout, [torch.zeros(64)])
    registry = WorkerRegistry(lease_timeout=1e9)
    ids = [registry.join(f"w{i}", 0, False, i).worker_id for i in range(4)]
    rule = SGDRule(lr=0.3)
    engine = (SyncRounds(store, rule, registry, num_workers=4) if mode == "sync"
              else AsyncEngine(store, rule, registry))
    screen = UpdateScreen(layout.region_indices(PARAM), clip=clip)
    gen = torch.Generator().manual_seed(0)
    sequence = 0
    for _ in range(versions):
        sequence += 1
        base = store.version
        w = store.snapshot().regions[0]
        for i, worker_id in enumerate(ids):
            grad = (w - target) + 0.05 * torch.randn(64, generator=gen)
            samples = 8
            if i == 3:
                grad, samples = -50 * (w - target) - 5.0, 800
            pieces = codec.whole_regions([grad])
            weighing = screen.weigh(pieces, samples)
            engine.submit(StagedPush(worker_id, 0, sequence, base if mode == "sync" else store.version,
                                     weighing.num_samples, 1.0, pieces, clip=weighing.clip))
    assert codec.finite(store.snapshot().regions[0])
    return float((store.snapshot().regions[0] - target).norm())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_clipping_keeps_a_poisoning_worker_from_steering_the_model(mode):
    start = float(torch.linspace(-1, 1, 64).norm())  # |w - target| at w = 0
    # K = 1.5: the poisoner moves the model at most 1.5 honest pushes' worth against the 3 honest ones
    # (K = 2 still converges in sync rounds; asynchronously it settles about 2.3 from the target)
    clipped = _quadratic_run(NormClip(factor=1.5), mode)
    unclipped = _quadratic_run(None, mode)  # the negative control: the same fleet without the clip
    assert clipped < 0.25 * start, f"with the clip the model still ended {clipped:.3g} from the target"
    assert unclipped > start, f"the poisoner did not hurt the unclipped run ({unclipped:.3g}): the test shows nothing"


def test_clipping_leaves_an_honest_fleet_alone():
    clip = NormClip(factor=3.0)
    gen = torch.Generator().manual_seed(1)
    scales = [clip.weigh(float(1.0 + 0.2 * torch.rand((), generator=gen)), 32).clip for _ in range(100)]
    assert scales == [1.0] * 100


def test_a_server_with_clipping_applies_the_clipped_update(start_server, connect):
    server = start_server(workers=1, lr=1.0, clip_factor=2.0)
    client = connect(server.port)
    client.join("a")
    w0 = pulled(client)[0].clone()
    version = 0
    for _ in range(3):  # warm-up: three pushes of norm 1 per element block
        version = client.push(GRAD, version, [torch.full_like(w0, 1e-3)], num_samples=4, loss=1.0).version
    before = pulled(client)[0].clone()
    attack = torch.full_like(w0, 1.0)  # 1000x the median norm
    client.push(GRAD, version, [attack], num_samples=4000, loss=1.0)
    step = before - pulled(client)[0]
    torch.testing.assert_close(step.norm(), torch.tensor(2.0 * 1e-3) * w0.numel() ** 0.5, rtol=1e-4, atol=0)
    assert server.engine.ledger.entries[-1].scale == pytest.approx(2e-3, rel=1e-4)


def test_a_checkpoint_holding_inf_is_skipped_on_resume(start_server, connect, tmp_path):
    server = start_server(checkpoint_dir=str(tmp_path))
    client = connect(server.port)
    client.join("a")
    w = pulled(client)[0]
    client.push(GRAD, 0, [torch.ones_like(w)], num_samples=1, loss=1.0)
    good = server.checkpoint()
    client.push(GRAD, 1, [torch.ones_like(w)], num_samples=1, loss=1.0)
    newest = server.checkpoint()
    model_state, server_state, meta = checkpoint.load_checkpoint(newest)
    name = next(iter(model_state))
    model_state[name] = torch.full_like(model_state[name], math.inf)
    checkpoint.save_checkpoint(str(tmp_path), meta["version"] + 1, model_state, server_state, metadata=meta)
    resumed = start_server(checkpoint_dir=str(tmp_path), resume=True)
    assert resumed.store.version == 2 and good  # the inf one (version 3) was skipped, the newest good one taken
    assert codec.finite(resumed.store.snapshot().regions[0])


@pytest.mark.timeout(90)
def test_ps_server_exits_1_naming_the_cause_when_the_run_diverges(tmp_path):
    """The console script: a run stopped as diverged is a failure (exit 1), not a finished run."""
    import os
    import subprocess
    import sys

    from conftest import fast_timeouts, wait_for
    from paramhub.worker.client import PSClient

    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, "-m", "paramhub.ps.cli", "--model", "mlp", "--num-classes", "4",
                               "--port", "0", "--port-file", str(port_file), "--lr", "10", "--weight-decay", "1",
                               "--momentum", "0"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: port_file.exists() or server.poll() is not None, 30, "ps-server to listen")
        with PSClient(f"127.0.0.1:{int(port_file.read_text())}", fast_timeouts()) as client:
            client.join("a")
            zero = [torch.zeros(client.info.layout.regions[0].numel)]
            version, reply = 0, None
            for _ in range(200):
                reply = client.push(GRAD, version, zero, num_samples=1, loss=1.0)
                if reply.done:
                    break
                version = reply.version
            assert reply.done, "the weights grew by 9x a version for 200 versions and nothing stopped them"
            client.leave()  # as a worker does on done: the server stops draining
        assert server.wait(timeout=30) == 1
        assert "run failed: the update to version" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
