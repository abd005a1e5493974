"""Elastic membership and data leases over the wire, with in-process servers on port 0.

Membership: a sync round waits for the live members (joined, pulled since), never
fewer than --workers less the lost ones, and --max-workers caps the trainers.
Leases: the pull hands them out, the push names what it trained on, the server
drops what was not leased and refuses what is malformed; weights stay untouched
by anything refused.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from conftest import wait_for
from paramhub.common.leases import Span
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.server import PSServer

GRAD = pb.PUSH_KIND_GRADIENT


def pull(client, leases: dict | None = None, min_version: int = 0) -> pb.PullHeader:
    regions = client.info.layout.empty_regions()
    return client.pull(regions, min_version, leases=leases)


def push(client, base_version: int, trained=(), num_samples: int | None = None, value: float = 0.01):
    grads = [torch.full((region.numel,), value) for region in client.info.layout.regions]
    samples = num_samples if num_samples is not None else max(1, sum(len(s) for s in trained))
    return client.push(GRAD, base_version, grads, num_samples=samples, loss=1.0, trained=trained)


def spans(header: pb.PullHeader, count: int) -> list[Span]:
    """The first ``count`` leased positions, as a push names them."""
    out = []
    for r in header.leases:
        take = min(count, r.end - r.start)
        if take <= 0:
            break
        out.append(Span(r.epoch, r.start, r.start + take))
        count -= take
    return out


def ask(samples: int = 40, wanted: int = 4, fingerprint: str = "fp") -> dict:
    return {"dataset_samples": samples, "dataset_fingerprint": fingerprint, "lease_samples_wanted": wanted}


def weights(server: PSServer) -> list[torch.Tensor]:
    return [t.clone() for t in server.store.snapshot().regions]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- membership -------------------------------------------------------------------------------


def test_a_sync_round_waits_for_the_members_and_a_joiner_counts_from_its_first_pull(start_server, connect):
    server = start_server(workers=2, mode="sync")
    a, b, c = connect(server.port), connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    pull(a), pull(b)
    assert server.engine.expected() == 2
    push(a, 0)
    c.join("c")  # joins mid-round without pulling: round 0 does not wait for it
    assert server.engine.expected() == 2
    push(b, 0)
    wait_for(lambda: server.store.version == 1, 5, "round 0 closed by a and b")
    pull(c)  # now a member: round 1 waits for all three
    assert server.engine.expected() == 3
    push(a, 1), push(b, 1)
    assert server.store.version == 1
    assert push(c, 1).outcome == pb.PUSH_OUTCOME_ACCEPTED  # the joiner's first push, in its first round
    wait_for(lambda: server.store.version == 2, 5, "round 1 closed with the joiner")
    b.leave()  # one that leaves stops counting
    assert server.engine.expected() == 2
    push(a, 2), push(c, 2)
    wait_for(lambda: server.store.version == 3, 5, "round 2 closed without b")
    status = a.status()
    assert (status.min_workers, status.round_members, status.joins, status.departures) == (2, 2, 3, 1)


def test_the_first_rounds_wait_for_the_workers_the_run_starts_with(start_server, connect):
    server = start_server(workers=3, mode="sync")
    a = connect(server.port)
    a.join("a")
    pull(a)
    assert server.engine.expected() == 3  # two are still to come
    push(a, 0)
    assert server.store.version == 0


def test_max_workers_caps_the_trainers_not_the_observers(start_server, connect):
    server = start_server(workers=1, max_workers=2)
    a, b, c, eye = (connect(server.port) for _ in range(4))
    a.join("a"), b.join("b")
    with pytest.raises(grpc.RpcError) as refused:
        c.join("c")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-workers 2" in refused.value.details()
    eye.join("eye", observer=True)
    a.leave()
    c.join("c")
    assert a.status().max_workers == 2


# -- data leases --------------------------------------------------------------------------------


def test_pulls_lease_and_pushes_count_each_position_once(start_server, connect):
    server = start_server(workers=1, mode="async", data_leases=True, lease_size=4, epochs=1)
    a = connect(server.port)
    a.join("a")
    header = pull(a, ask(samples=12, wanted=6))
    assert [(r.epoch, r.start, r.end) for r in header.leases] == [(0, 0, 8)]  # two whole leases, as one range
    trained = spans(header, 6)
    assert push(a, 0, trained).outcome == pb.PUSH_OUTCOME_ACCEPTED
    header = pull(a, ask(samples=12, wanted=6))
    assert [(r.epoch, r.start, r.end) for r in header.leases] == [(0, 6, 12)]  # topped up by one more lease
    status = a.status()
    assert [(e.epoch, e.done, e.in_pushes, e.leased, e.pending) for e in status.epochs] == [(0, 6, 0, 6, 0)]
    push(a, 1, spans(header, 6))
    wait_for(lambda: server.store.done, 5, "the one epoch done")
    assert a.status().epochs_completed == 1


def test_what_is_not_leased_is_dropped_and_what_is_malformed_refused(start_server, connect):
    server = start_server(workers=1, mode="async", data_leases=True, lease_size=4)
    a, b, eye = connect(server.port), connect(server.port), connect(server.port)
    a.join("a"), b.join("b"), eye.join("eye", observer=True)
    header = pull(a, ask())
    pull(b, ask())
    before = weights(server)
    # b's positions, or positions nobody holds: dropped, nothing applied
    for trained in ([Span(0, 4, 6)], [Span(0, 30, 32)], [Span(7, 0, 2)]):
        reply = push(a, 0, trained)
        assert reply.outcome == pb.PUSH_OUTCOME_DROPPED
    assert same(before, weights(server))
    refusals = [
        (lambda: push(a, 0, spans(header, 2), num_samples=3), grpc.StatusCode.INVALID_ARGUMENT),  # 2 positions, 3 said
        (lambda: push(a, 0, (), num_samples=2), grpc.StatusCode.INVALID_ARGUMENT),  # names nothing
        (lambda: pull(a, ask(samples=41)), grpc.StatusCode.FAILED_PRECONDITION),  # another dataset
        (lambda: pull(a, ask(fingerprint="other")), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: pull(a, ask(wanted=(1 << 24) + 1)), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: pull(eye, ask()), grpc.StatusCode.FAILED_PRECONDITION),  # observers train on nothing
    ]
    for call, code in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code, refused.value.details()
    assert same(before, weights(server))
    assert push(a, 0, spans(header, 2)).outcome == pb.PUSH_OUTCOME_ACCEPTED  # its own leases still hold


def test_a_run_without_leases_refuses_them(start_server, connect):
    server = start_server(workers=1)
    a = connect(server.port)
    a.join("a")
    with pytest.raises(grpc.RpcError) as refused:
        pull(a, ask())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as refused:
        push(a, 0, [Span(0, 0, 2)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_dropped_push_gives_its_positions_back_to_its_worker(start_server, connect):
    server = start_server(workers=2, mode="sync", data_leases=True, lease_size=4)
    a, b = connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    header_a, header_b = pull(a, ask()), pull(b, ask())
    push(a, 0, spans(header_a, 2)), push(b, 0, spans(header_b, 2))
    wait_for(lambda: server.store.version == 1, 5, "round 0")
    header_a = pull(a, ask())
    late = spans(header_a, 2)
    assert push(a, 0, late).outcome == pb.PUSH_OUTCOME_DROPPED  # round 0 has closed
    header_a = pull(a, ask(), min_version=1)
    assert spans(header_a, 2) == late  # the same positions come back first, to train again


def test_a_departed_workers_leases_go_to_the_others(start_server, connect):
    server = start_server(workers=1, mode="async", data_leases=True, lease_size=4, epochs=1)
    a, b = connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    header = pull(a, ask(samples=8, wanted=8))
    assert sum(r.end - r.start for r in header.leases) == 8
    push(a, 0, spans(header, 3))  # 3 trained; 5 still leased to a
    assert list(pull(b, ask(samples=8)).leases) == []  # nothing left: b is idle
    assert b.info.worker_id in server.engine.leases.idle
    a.leave()
    header = pull(b, ask(samples=8, wanted=8))
    assert [(r.start, r.end) for r in header.leases] == [(3, 8)]  # a's untrained positions
    push(b, 1, spans(header, 5))
    wait_for(lambda: server.store.done, 5, "the epoch done by b")
    status = b.status()
    assert status.epochs_completed == 1 and status.leases_reassigned == 5


def test_a_resumed_server_leases_again_what_its_checkpoint_had_not_done(start_server, connect, tmp_path):
    overrides = dict(workers=1, mode="async", data_leases=True, lease_size=4, checkpoint_dir=str(tmp_path))
    server = start_server(**overrides)
    a = connect(server.port)
    a.join("a")
    header = pull(a, ask(samples=10, wanted=8))
    push(a, 0, spans(header, 5))
    server.checkpoint()
    push(a, 1, [Span(0, 5, 7)])  # applied after the checkpoint: lost with the crash below, so trained again
    server.shutdown(grace=0)
    resumed = start_server(**overrides, resume=True)
    b = connect(resumed.port)
    b.join("a")
    assert resumed.store.version == 1
    header = pull(b, ask(samples=10, wanted=10))
    # epoch 0 from position 5 on (the 5 done before the checkpoint stay done), then epoch 1's first leases
    assert [(r.epoch, r.start, r.end) for r in header.leases] == [(0, 5, 10), (1, 0, 8)]


def test_metrics_count_joins_departures_and_the_epochs_samples(start_server, connect):
    from test_metrics import scrape, value

    server = start_server(workers=1, mode="async", data_leases=True, lease_size=4, metrics_port=0)
    a, b = connect(server.port), connect(server.port)
    a.join("a"), b.join("b")
    header = pull(a, ask(samples=10, wanted=4))
    push(a, 0, spans(header, 2))
    pull(b, ask(samples=10, wanted=4))
    b.leave()
    samples = scrape(server.metrics_port)
    assert value(samples, "paramhub_worker_joins_total") == 2
    assert value(samples, "paramhub_worker_departures_total") == 1
    assert value(samples, "paramhub_lease_samples_reassigned_total") == 4
    states = {state: value(samples, "paramhub_epoch_samples", epoch="0", state=state)
              for state in ("done", "in_pushes", "leased", "pending")}
    assert states == {"done": 2, "in_pushes": 0, "leased": 2, "pending": 6}
    assert value(samples, "paramhub_epochs_completed") == 0
    assert value(samples, "paramhub_pushes_dropped_total", reason="not_leased") is None


@pytest.mark.parametrize("fields, message", [
    ({"workers": 3, "max_workers": 2}, "--max-workers"),
    ({"data_leases": True, "partition": (0, 2)}, "--partition"),
    ({"epochs": 3}, "--epochs"),
    ({"data_leases": True, "lease_size": 0}, "--lease-size"),
])
def test_settings_that_contradict_each_other_are_refused(fields, message):
    from paramhub.common.config import ServerConfig

    with pytest.raises(ValueError, match=message):
        ServerConfig(**fields)


def test_the_status_page_shows_membership_and_leases(start_server, connect, tmp_path):
    import re
    import subprocess

    from test_status_page import CHROMIUM, CHROMIUM_FLAGS, api_status

    server = start_server(workers=1, max_workers=3, mode="async", data_leases=True, lease_size=4, http_port=0)
    a = connect(server.port)
    a.join("a")
    push(a, 0, spans(pull(a, ask(samples=10, wanted=4)), 3))
    page = api_status(server.http_port)
    assert page["membership"] == {"min_workers": 1, "max_workers": 3, "round_members": 1, "joins": 1,
                                  "departures": 0}
    assert page["leases"] == {"epochs": [{"epoch": 0, "done": 3, "in_pushes": 0, "leased": 1, "pending": 6}],
                              "completed": 0, "reassigned": 0}
    if CHROMIUM is None:
        pytest.skip("the JSON is checked; drawing it needs Debian's chromium (.ci/run installs it)")
    browser = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(browser + ["--dump-dom", f"http://127.0.0.1:{server.http_port}/"], capture_output=True,
                         text=True, timeout=90).stdout
    table = re.search(r'<table id="leases">.*?</table>', dom, re.S).group(0)
    assert re.findall(r"<td>(\d+)</td>", table) == ["0", "3", "0", "1", "6"]
    assert "at most 3 at once; 1 joins, 0 departures" in dom


def test_ps_ctl_status_prints_membership_and_leases(start_server, connect):
    from paramhub.ps.status import from_response
    from paramhub.tools.ctl import status_table

    server = start_server(workers=2, mode="sync", data_leases=True, lease_size=4)
    a = connect(server.port)
    a.join("a")
    pull(a, ask(samples=10, wanted=4))
    text = status_table(from_response(a.status()))
    assert "membership: a round waits for 2; at least 2 to start, at most any number of at once; 1 joins" in text
    assert "data leases: 0 epoch(s) complete, 0 leased samples given back by departures" in text
    assert text.splitlines()[-1].split() == ["0", "0", "0", "4", "6"]


def test_a_trainer_waiting_for_its_round_does_not_train_the_same_version_twice(start_server, connect):
    """Sync under leases: the other worker is slower than --pull-wait, so the trainer's pull for the next
    version comes back header only, with leases; it must pull again, not push a second time for the round."""
    from conftest import fast_timeouts, train_in_threads
    from paramhub.common.config import WorkerConfig
    from paramhub.common.data import leased_dataset

    server = start_server(workers=2, mode="sync", data_leases=True, lease_size=4, epochs=1,
                          timeouts=fast_timeouts(pull_wait=0.5))
    _, fingerprint = leased_dataset("synthetic", num_classes=4, image_size=8, synthetic_size=16)
    slow = connect(server.port)
    slow.join("slow")
    header = pull(slow, ask(samples=16, wanted=4, fingerprint=fingerprint))

    def push_late():  # after the trainer's pull for version 1 has come back header only a few times
        wait_for(lambda: server.engine.round_pushes == 1, 30, "the trainer's push for round 0")
        time.sleep(2)  # the scenario itself: a worker slower than --pull-wait, not a wait for a condition
        push(slow, 0, spans(header, 4))
        slow.leave()

    late = threading.Thread(target=push_late, daemon=True)
    late.start()
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", synthetic_size=16, image_size=8,
                          batch_size=4, log_every=0, name="trainer", timeouts=fast_timeouts())
    summary = train_in_threads(config, 1)[0]
    late.join(timeout=10)
    assert server.store.done and server.engine.leases.completed == 1
    assert summary.pushes_accepted == 3  # 12 of the 16 samples, 4 a push; the slow worker trained 4
    assert server.servicer.pushes_rejected == 0
