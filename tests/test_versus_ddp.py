"""paramhub's sync-grad mode is torch DDP: same initial weights, same per-worker batches, equal after every step.

paramhub side: a real in-process server and N real Trainers (threads); every version
the store publishes is recorded as it is published (what was applied, not the
ledger). DDP side: N gloo processes (``paramhub.tools.ddp``) with per-rank BatchNorm
statistics (``broadcast_buffers=False``), each writing its state after every step.
Parameters must equal DDP's; buffers must equal the mean of DDP's ranks (BatchNorm's
running statistics are linear in the batch statistics, so averaging each step's
worker statistics is averaging the ranks'). Negative controls: the same comparison
must reject references that are wrong in the ways a parameter server goes wrong
(gradients summed instead of averaged, momentum dropped, BatchNorm statistics of
one worker instead of the mean).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fast_timeouts, train_in_threads
from paramhub.common.config import WorkerConfig
from paramhub.tools.ddp import DDPSpec, launch

pytestmark = pytest.mark.timeout(300)
WORKERS, STEPS, LR, CLASSES, IMAGE, BATCH = 2, 4, 0.01, 4, 32, 16


def record_published(server) -> dict[int, dict[str, torch.Tensor]]:
    """Wraps the store's publish: a copy of the full state of every version, keyed by version."""
    published = {}
    publish = server.store.publish

    def spy(regions):
        version = publish(regions)
        published[version] = {k: v.clone() for k, v in server.model_state(regions).items()}
        return version

    server.store.publish = spy
    return published


def close(ours: torch.Tensor, reference: torch.Tensor, initial: torch.Tensor) -> bool:
    """Equal to float tolerance: within 0.1% of how far the reference moved from the initial state.

    Float sums in another order (gloo's all-reduce, another thread count) differ in the
    last bits, and a few steps of a small-batch BatchNorm network amplify that; every
    wrong update rule is off by a sizeable fraction of a step.
    """
    moved = float((reference.double() - initial.double()).abs().max())
    return float((ours.double() - reference.double()).abs().max()) <= 1e-3 * moved + 1e-6


def differing(ours: dict, reference: dict, names, initial: dict) -> list[str]:
    """The tensors of ``names`` where ``ours`` is not ``reference`` to float tolerance."""
    return [n for n in names if not close(ours[n], reference[n], initial[n])]


def rank_mean(ranks: list[dict], name: str) -> torch.Tensor:
    stacked = torch.stack([r[name].double() for r in ranks])
    mean = stacked.mean(0)
    return mean.round().to(ranks[0][name].dtype) if not ranks[0][name].is_floating_point() else mean


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["plain", "momentum"])
def runs(request, tmp_path_factory):
    """(paramhub's published states by version, DDP's per-rank states by step, initial state, param names).

    Module-scoped: both tests read the same pair of runs (the tests only read them), one pair per momentum.
    """
    from paramhub.common.config import ServerConfig
    from paramhub.ps.server import PSServer

    momentum = request.param
    tmp_path = tmp_path_factory.mktemp("versus-ddp")
    server = PSServer(ServerConfig(host="127.0.0.1", port=0, model="resnet18", num_classes=CLASSES, workers=WORKERS,
                                   mode="sync", update="grad", lr=LR, momentum=momentum, max_steps=STEPS,
                                   timeouts=fast_timeouts(), done_grace_s=1.0))
    server.start()
    request.addfinalizer(lambda: server.shutdown(grace=0))
    initial = {k: v.clone() for k, v in server.model_state(server.store.snapshot().regions).items()}
    params = [t.name for t in server.layout.tensors if t.role == "param"]
    published = record_published(server)
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", batch_size=BATCH, image_size=IMAGE,
                          augment="none", synthetic_size=64, log_every=0, device="cpu", timeouts=fast_timeouts())
    # One torch thread, as each DDP rank has: the same kernels sum in the same order, and a few steps
    # of this small-batch network amplify any last-bit difference (DDP against itself with 1 and 2
    # threads: 0.4% of a step apart after 4 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_threads(config, WORKERS)
    finally:
        torch.set_num_threads(threads)

    save_file(initial, tmp_path / "init.safetensors")
    spec = DDPSpec(arch="resnet18", num_classes=CLASSES, data="synthetic", image_size=IMAGE, batch_size=BATCH,
                   steps=STEPS, lr=LR, momentum=momentum, augment="none", synthetic_size=64,
                   init=str(tmp_path / "init.safetensors"), out=str(tmp_path / "ddp"), world_size=WORKERS,
                   record_every_rank=True, broadcast_buffers=False, threads=1)
    launch(spec, timeout=240)
    ddp = {step: [load_file(tmp_path / "ddp" / f"rank{r}" / f"step-{step:06d}.safetensors") for r in range(WORKERS)]
           for step in range(1, STEPS + 1)}
    return published, ddp, initial, params, momentum


def test_parameters_and_buffers_equal_ddp_after_every_step(runs):
    published, ddp, initial, params, _ = runs
    assert sorted(published) == list(range(1, STEPS + 1))
    buffers = [n for n in initial if n not in params]
    assert any("running_var" in n for n in buffers) and any("num_batches_tracked" in n for n in buffers)
    for step in range(1, STEPS + 1):
        ours, ranks = published[step], ddp[step]
        assert not differing(ranks[0], ranks[1], params, initial), "DDP's ranks disagree on the weights"
        assert not differing(ours, ranks[0], params, initial), f"step {step}: weights differ from DDP"
        mean = {n: rank_mean(ranks, n) for n in buffers}
        assert not differing(ours, mean, buffers, initial), f"step {step}: buffers differ from DDP's rank mean"
    assert differing(published[STEPS], initial, params, initial), "nothing was trained"


def test_the_comparison_rejects_wrong_updates(runs):
    """Negative controls: references built wrong in known ways must not match what paramhub applied."""
    published, ddp, initial, params, momentum = runs
    w0, w1, w2 = initial, ddp[1][0], ddp[2][0]
    # Step 1 is w1 = w0 - lr * g1 with any momentum. Summed instead of averaged: w0 - 2 lr g1.
    summed = {n: 2 * w1[n] - w0[n] for n in params}
    assert differing(published[1], summed, params, initial)
    # BatchNorm statistics of worker 0 alone instead of the mean of both.
    buffers = [n for n in initial if n not in params and initial[n].is_floating_point()]
    assert differing(published[1], ddp[1][0], buffers, initial)
    assert differing(published[1], ddp[1][1], buffers, initial)
    if momentum:
        # Step 2 with momentum: w2 = w1 - lr (m g1 + g2); momentum dropped: w1 - lr g2 = w2 + m (w0 - w1).
        dropped = {n: w2[n] + momentum * (w0[n] - w1[n]) for n in params}
        assert differing(published[2], dropped, params, initial)
