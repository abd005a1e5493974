"""Convergence on real images that can fail: a threshold from DDP's measured curve, DDP itself, and broken servers.

The task: scikit-learn's handwritten digits (1,797 real scans) at 16 px, split by
ps-data into 2 shards and a held-out fifth; resnet18 (BatchNorm throughout), 2 real
Trainers against a real in-process server, SGD lr 0.01 momentum 0.9, batch 32 per
worker, 80 steps. Two criteria, both from DDP:

- the held-out top-1 must reach THRESHOLD, set below what torch DDP reaches with this
  recipe on every seed measured;
- the trained weights must be DDP's own: torch DDP (``tools/ddp.py``) trains from the
  same weights on the same batches in the test, and paramhub's weights must lie within
  1% of the distance DDP travelled from the start.

Negative controls train with a server broken in the ways that cost accuracy silently —
the gradient applied twice, summed instead of averaged, momentum dropped, BatchNorm
statistics not applied — and each must fail at least one criterion. (A doubled step
alone can still reach the threshold: DDP at lr 0.02 did. The trajectory catches it.)
The three that change the weights' update leave DDP's trajectory from the first steps, so
they train SHORT_STEPS only and are held to the trajectory criterion at that version, which
the correct server's own version SHORT_STEPS must meet. The BatchNorm one stays on DDP's
trajectory (only its statistics are wrong) and is caught by top-1 alone: it trains
BATCHNORM_STEPS and is held to BATCHNORM_BOUND, which the correct server's version
BATCHNORM_STEPS must reach.
"""

from __future__ import annotations

import dataclasses

import pytest
import sklearn  # noqa: F401  the digits come with scikit-learn, a dev dependency: no skip without it
import torch
from safetensors.torch import load_file, save_file

from conftest import fast_timeouts, train_in_threads
from paramhub.common.config import WorkerConfig
from paramhub.common.layout import BUFFER, PARAM

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IMAGE, WORKERS, BATCH, LR, MOMENTUM, STEPS = 16, 2, 32, 0.01, 0.9, 80
# torch DDP with this recipe (same shards and order, no augmentation, 1 thread per rank): held-out top-1
# after 80 steps 0.942, 0.928, 0.944 for seeds 0-2 (BENCHMARKS.md "Convergence tests"); at lr 0.02: 0.95, 0.95, 0.727.
THRESHOLD = 0.90
TRAJECTORY_TOLERANCE = 0.01
# Where the broken update rules are compared with DDP. Off DDP's trajectory after 80 steps (one run): applied
# twice 1.67, summed 3.29, momentum dropped 0.96; after 10 steps: 2.15, 4.34, 0.90, the correct server 0 (bit-
# identical), so the margin to the 1% tolerance is 90x. Top-1 tells nothing apart this early (0.10 for DDP and
# the first two, chance), so at SHORT_STEPS the trajectory alone must reject them. 10 steps instead of 80 each.
SHORT_STEPS = 10
# Held-out top-1 after 60 steps: DDP 0.894, 0.866, 0.897 for seeds 0-2 (BENCHMARKS.md), this test's correct
# server 0.911 (DDP's rank 0 0.908); without the BatchNorm statistics 0.10 (chance) after 60 and after 80 steps.
# A bound halfway leaves 0.37 either side; at 40 steps seed 1 is at 0.42, too early. 60 steps instead of 80.
BATCHNORM_STEPS, BATCHNORM_BOUND = 60, 0.5


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(the directory of both shards, held-out images, labels)."""
    from paramhub.common.data import eval_transform, image_folder
    from paramhub.common.shards import split_dataset
    from paramhub.tools.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images", IMAGE)
    split_dataset(str(root / "images"), str(root / "split"), WORKERS, val_fraction=0.2, seed=0)
    val = image_folder(root / "split" / "val", eval_transform(IMAGE))
    images = torch.stack([val[i][0] for i in range(len(val))])
    return root / "split", images, torch.tensor(val.targets)


def held_out_top1(state: dict, images, labels) -> float:
    """Top-1 of a state_dict loaded into a plain torchvision resnet18."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


@dataclasses.dataclass(frozen=True)
class Outcome:
    top1: float
    state: dict


def start(start_server, **overrides):
    options = dict(model="resnet18", num_classes=10, workers=WORKERS, mode="sync", update="grad", lr=LR,
                   momentum=MOMENTUM, max_steps=STEPS)
    options.update(overrides)
    return start_server(**options)


def run_workers(server, digits, **config_overrides) -> Outcome:
    split, images, labels = digits
    # no augmentation: its random crops draw from the process's shared RNG, so runs would differ by chance
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data=str(split), batch_size=BATCH, image_size=IMAGE,
                          augment="none", log_every=0, device="cpu", timeouts=fast_timeouts(round=60, transfer=60),
                          **config_overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP rank: the same kernels, summing in the same order
    try:
        train_in_threads(config, WORKERS, timeout=400)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.clone() for k, v in server.model_state(server.store.snapshot().regions).items()}
    return Outcome(held_out_top1(state, images, labels), state)


@dataclasses.dataclass(frozen=True)
class Reference:
    """DDP's run from the server's initial weights."""

    initial: dict
    after: dict  # {steps: state} for STEPS, SHORT_STEPS and BATCHNORM_STEPS


@pytest.fixture(scope="module")
def ddp(digits, tmp_path_factory) -> Reference:
    """DDP's states from the weights the server starts from (seed 0)."""
    from paramhub.common.models import initial_state
    from paramhub.tools.ddp import DDPSpec, launch

    work = tmp_path_factory.mktemp("ddp")
    initial = {k: v.contiguous() for k, v in initial_state("resnet18", 10, 0).state.items()}
    save_file(initial, work / "init.safetensors")
    launch(DDPSpec(arch="resnet18", num_classes=10, data=str(digits[0]), image_size=IMAGE, batch_size=BATCH,
                   steps=STEPS, lr=LR, momentum=MOMENTUM, augment="none", init=str(work / "init.safetensors"),
                   out=str(work / "out"), world_size=WORKERS, threads=1, save_every=SHORT_STEPS), timeout=600)
    return Reference(initial, {step: load_file(work / "out" / f"model-{step:06d}.safetensors")
                               for step in (STEPS, SHORT_STEPS, BATCHNORM_STEPS)})


def off_trajectory(state: dict, initial: dict, reference: dict, params) -> float:
    """How far paramhub's weights are from DDP's ``reference``, as a fraction of the distance DDP travelled."""
    apart = torch.sqrt(sum(((state[n] - reference[n]).double() ** 2).sum() for n in params))
    travelled = torch.sqrt(sum(((reference[n] - initial[n]).double() ** 2).sum() for n in params))
    return float(apart / travelled)


def record_versions(server, *versions: int) -> dict[int, dict]:
    """Wraps the store's publish: the returned dict gets a copy of the full state of each of ``versions``, by
    version, as it is published."""
    recorded, publish = {}, server.store.publish

    def spy(regions):
        published = publish(regions)
        if published in versions:
            recorded[published] = {k: v.clone() for k, v in server.model_state(regions).items()}
        return published

    server.store.publish = spy
    return recorded


@dataclasses.dataclass(frozen=True)
class Twice:
    """Broken: applies the server's step two times per update."""

    inner: object

    def apply(self, params, update, state, version, out=None):
        once = self.inner.apply(params, update.clone(), state, version)
        return self.inner.apply(once, update, state, version, out=out)


@dataclasses.dataclass(frozen=True)
class Summed:
    """Broken: the workers' gradients summed, not averaged."""

    inner: object
    workers: int

    def apply(self, params, update, state, version, out=None):
        return self.inner.apply(params, update * self.workers, state, version, out=out)


def broken_rule(monkeypatch, wrap) -> None:
    from paramhub.ps import builder

    correct = builder.RULES["grad"]
    monkeypatch.setitem(builder.RULES, "grad", lambda config: wrap(correct(config)))


def without_batchnorm_statistics(server) -> None:
    """Broken: every version keeps the initial BatchNorm statistics (the pushed ones are never applied)."""
    publish, initial = server.store.publish, list(server.store.snapshot().regions)
    buffers = server.layout.region_indices(BUFFER)
    server.store.publish = lambda regions: publish([initial[r] if r in buffers else t for r, t in enumerate(regions)])


def test_sync_grad_reaches_ddp_and_broken_servers_do_not(start_server, digits, ddp, monkeypatch):
    server = start(start_server)
    params = [t.name for t in server.layout.tensors if t.role == PARAM]
    correct_at = record_versions(server, SHORT_STEPS, BATCHNORM_STEPS)
    correct = run_workers(server, digits)
    correct_off = off_trajectory(correct.state, ddp.initial, ddp.after[STEPS], params)
    assert correct.top1 >= THRESHOLD, f"sync-grad reached {correct.top1:.3f}, DDP's threshold is {THRESHOLD}"
    assert correct_off <= TRAJECTORY_TOLERANCE
    assert correct.top1 == pytest.approx(held_out_top1(ddp.after[STEPS], *digits[1:]), abs=0.02)
    # the criteria the shorter broken runs are held to, met by the correct server at the same versions
    correct_short_off = off_trajectory(correct_at[SHORT_STEPS], ddp.initial, ddp.after[SHORT_STEPS], params)
    assert correct_short_off <= TRAJECTORY_TOLERANCE
    correct_batchnorm_top1 = held_out_top1(correct_at[BATCHNORM_STEPS], *digits[1:])
    assert correct_batchnorm_top1 >= BATCHNORM_BOUND, f"step {BATCHNORM_STEPS}: {correct_batchnorm_top1:.3f}"

    short = {}  # (top-1, off trajectory) after SHORT_STEPS
    broken_rule(monkeypatch, Twice)
    short["gradient applied twice"] = run_workers(start(start_server, max_steps=SHORT_STEPS), digits)
    broken_rule(monkeypatch, lambda rule: Summed(rule, WORKERS))
    short["summed instead of averaged"] = run_workers(start(start_server, max_steps=SHORT_STEPS), digits)
    monkeypatch.undo()
    short["momentum dropped"] = run_workers(start(start_server, momentum=0.0, max_steps=SHORT_STEPS), digits)
    short_report = {name: (round(o.top1, 3), round(off_trajectory(o.state, ddp.initial, ddp.after[SHORT_STEPS],
                                                                  params), 3))
                    for name, o in short.items()}

    server = start(start_server, max_steps=BATCHNORM_STEPS)
    without_batchnorm_statistics(server)
    no_statistics = run_workers(server, digits)
    top1, off = round(no_statistics.top1, 3), round(off_trajectory(no_statistics.state, ddp.initial,
                                                                   ddp.after[BATCHNORM_STEPS], params), 3)

    print(f"correct: top-1 {correct.top1:.3f} ({correct_batchnorm_top1:.3f} at step {BATCHNORM_STEPS}), off DDP's "
          f"trajectory {correct_off:.2e} ({correct_short_off:.2e} at step {SHORT_STEPS}); broken at step "
          f"{SHORT_STEPS} (top-1, off trajectory): {short_report}; BatchNorm statistics not applied at step "
          f"{BATCHNORM_STEPS}: {(top1, off)}")
    on_track = {name: r for name, r in short_report.items() if r[1] <= TRAJECTORY_TOLERANCE}
    assert not on_track, f"broken update rules stayed on DDP's trajectory for {SHORT_STEPS} steps: {on_track}"
    assert not (top1 >= BATCHNORM_BOUND and off <= TRAJECTORY_TOLERANCE), \
        f"a server that drops the BatchNorm statistics met both criteria: {(top1, off)}"
