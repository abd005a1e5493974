"""A poisoning worker among honest ones, on real images: --clip-factor keeps the model training.

Two honest Trainers train resnet18 on the digits (the recipe of test_convergence_digits)
in sync rounds of three; the third member of every round is a hostile client that
pushes Gaussian noise a thousand times the size of an honest gradient and claims a
hundred times the samples, with the BatchNorm statistics it pulled. Its values are
finite and below --max-update-abs, so only the robust rule stands in its way.

- With ``--clip-factor 3`` the model must still reach CLIPPED_THRESHOLD (0.85; the honest recipe's DDP
  reaches 0.93-0.94).
- Without it (the negative control) the same fleet must be near chance after UNCLIPPED_STEPS,
  where the clipped run was already past CHANCE_BOUND: the attack is real, so the clip is
  what saved the first run.
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import fast_timeouts
from paramhub.common.layout import PARAM
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.worker.client import PSClient
from test_convergence_digits import (  # noqa: F401 (fixture)
    BATCH, LR, MOMENTUM, digits, held_out_top1, record_versions, run_workers)

pytest.importorskip("sklearn", reason="the digits come with scikit-learn (make install installs it)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 80
NOISE_NORM = 1000.0  # an honest gradient's norm here is about 1-10
# With the clip, measured 0.942 and 0.894 (the clip's median depends on the order pushes arrive in);
# without it 0.095-0.097, chance 0.1. test_convergence_digits.THRESHOLD (0.90) is for a fleet without attackers.
CLIPPED_THRESHOLD = 0.85
# The negative control stops at step 60, not 80: held-out top-1 at step 60, measured in five clipped runs 0.788,
# 0.760, 0.891, 0.900, 0.838 (at step 50 0.733 and 0.448, too close to call); unclipped 0.109-0.125 at 60 (four
# runs), 0.097 at 80.
UNCLIPPED_STEPS = 60
CHANCE_BOUND = 0.5


def poison(port: int, stop: threading.Event, errors: list) -> None:
    """Joins and pushes noise for every version until the run is done."""
    try:
        with PSClient(f"127.0.0.1:{port}", fast_timeouts(round=60, transfer=60)) as client:
            info = client.join(name="poisoner", shard=2)
            layout = info.layout
            regions = layout.empty_regions()
            params = set(layout.region_indices(PARAM))
            gen = torch.Generator().manual_seed(0)
            version = 0
            while not stop.is_set():
                header = client.wait_and_pull(regions, version)
                if header.done:
                    return
                version = header.version
                update = []
                for r, region in enumerate(regions):
                    if r in params:
                        noise = torch.randn(region.shape, generator=gen)
                        update.append(noise * (NOISE_NORM / float(noise.norm()) / len(params) ** 0.5))
                    else:
                        update.append(region)  # BatchNorm statistics as pulled: the clip leaves buffers alone
                reply = client.push(pb.PUSH_KIND_GRADIENT, version, update, num_samples=100 * BATCH, loss=2.3)
                if reply.done:
                    return
                version = reply.next_version
    except Exception as exc:  # re-raised by the test
        errors.append(exc)


def attacked_run(start_server, digits, steps: int, record: int | None = None,  # noqa: F811 (fixture)
                 **server_options) -> tuple[float, float | None]:
    """(held-out top-1 after ``steps``, held-out top-1 at version ``record`` or None)."""
    server = start_server(model="resnet18", num_classes=10, workers=3, mode="sync", update="grad", lr=LR,
                          momentum=MOMENTUM, max_steps=steps, **server_options)
    recorded = record_versions(server, record)
    stop, errors = threading.Event(), []
    attacker = threading.Thread(target=poison, args=(server.port, stop, errors), daemon=True)
    attacker.start()
    try:
        outcome = run_workers(server, digits, num_shards=2)  # the poisoner has no shard of its own
    finally:
        stop.set()
        attacker.join(timeout=60)
    assert not errors, errors
    assert server.store.version == steps
    applied = {entry.worker_id for entry in server.engine.ledger.entries}
    assert len(applied) == 3, "the poisoner's pushes were not part of the rounds: the test shows nothing"
    return outcome.top1, held_out_top1(recorded[record], *digits[1:]) if record is not None else None


def test_clipping_keeps_training_on_track_with_a_poisoning_worker(start_server, digits):  # noqa: F811
    clipped, clipped_early = attacked_run(start_server, digits, STEPS, record=UNCLIPPED_STEPS, clip_factor=3.0)
    unclipped, _ = attacked_run(start_server, digits, UNCLIPPED_STEPS)
    print(f"held-out top-1 with a poisoner: clipped {clipped:.3f} ({clipped_early:.3f} at step {UNCLIPPED_STEPS}), "
          f"unclipped {unclipped:.3f} at step {UNCLIPPED_STEPS}")
    assert clipped >= CLIPPED_THRESHOLD, f"with --clip-factor 3 the model reached only {clipped:.3f}"
    assert clipped_early >= CHANCE_BOUND, \
        f"the clipped run was at {clipped_early:.3f} at step {UNCLIPPED_STEPS}: too early to tell harm from slowness"
    assert unclipped < CHANCE_BOUND, \
        f"the unclipped run reached {unclipped:.3f}: the attack did no harm, the test shows nothing"
