"""A standby server (ps/replication.py), in process: bitwise-equal replication, the durability gate, failover."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
import torch

from conftest import fast_timeouts, wait_for

from paramhub.common.config import ServerConfig
from paramhub.common.layout import PARAM
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.replication import Fenced
from paramhub.worker.client import ServerUnreachable

pytestmark = pytest.mark.timeout(90)
GRAD = pb.PUSH_KIND_GRADIENT


def state_of(server) -> dict:
    """Everything a standby must hold bitwise: version, weights, optimizer state, ledger."""
    with server.store.lock:
        snap = server.store.snapshot()
        return {"version": snap.version, "regions": [t.clone() for t in snap.regions],
                "rule": {r: {k: v.clone() for k, v in s.items()} for r, s in server.store.rule_state.items()},
                "ledger": list(server.engine.ledger.entries), "done": snap.done}


def same_state(a: dict, b: dict) -> bool:
    """Independent of the replication code: tensors compared with torch.equal (bitwise)."""
    return (a["version"] == b["version"] and a["ledger"] == b["ledger"]
            and len(a["regions"]) == len(b["regions"])
            and all(torch.equal(x, y) for x, y in zip(a["regions"], b["regions"]))
            and a["rule"].keys() == b["rule"].keys()
            and all(a["rule"][r].keys() == b["rule"][r].keys()
                    and all(torch.equal(a["rule"][r][k], b["rule"][r][k]) for k in a["rule"][r]) for r in a["rule"]))


def gradient(client, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(region.numel, generator=generator).to(region.dtype) if region.dtype.is_floating_point
            else torch.zeros(region.numel, dtype=region.dtype) for region in client.info.layout.regions]


def start_pair(start_server, standby_dir=None, **overrides):
    primary = start_server(**overrides)
    if standby_dir:
        overrides["checkpoint_dir"] = standby_dir
    standby = start_server(standby_for=f"127.0.0.1:{primary.port}", **overrides)
    threading.Thread(target=standby.run_until_done, daemon=True).start()
    wait_for(lambda: primary.replicator.state == "attached" and standby.follower.connected, 20, "standby attached")
    return primary, standby


RULES = {"sgd": dict(optimizer="sgd", momentum=0.9, lr=0.05), "adamw": dict(optimizer="adamw", lr=0.01)}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("rule", list(RULES))
def test_the_standby_ends_bitwise_equal_to_its_primary(start_server, connect, mode, rule):
    primary, standby = start_pair(start_server, mode=mode, workers=2, **RULES[rule])
    clients = [connect(primary.port) for _ in range(2)]
    for i, client in enumerate(clients):
        client.join(name=f"w{i}")
    for step in range(4):
        if mode == "sync":  # both push for the round; the second push closes it
            threads = [threading.Thread(target=c.push, args=(GRAD, step, gradient(c, 10 * step + i), 3 + i, 0.5))
                       for i, c in enumerate(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        else:
            for i, c in enumerate(clients):
                c.push(GRAD, primary.store.version, gradient(c, 10 * step + i), 3 + i, 0.5)
    assert primary.store.version == (4 if mode == "sync" else 8)
    wait_for(lambda: standby.store.version == primary.store.version, 10, "standby caught up")
    assert same_state(state_of(primary), state_of(standby))
    assert primary.replicator.acked == primary.store.version  # every version was acked before it was seen


def test_updates_replicated_in_the_wire_dtype_leave_the_standby_bitwise_equal(start_server, connect):
    primary, standby = start_pair(start_server, mode="async", workers=1, wire_dtype="bf16",
                                  replicate_in_wire_dtype=True, **RULES["adamw"])
    shipped = []
    hook = primary.engine.on_published
    primary.engine.on_published = lambda update: (shipped.append(update), hook(update))
    client = connect(primary.port)
    client.join(name="w")
    for step in range(3):
        client.push(GRAD, step, gradient(client, step), 2, 0.5)
    wait_for(lambda: standby.store.version == 3, 10, "standby caught up")
    assert same_state(state_of(primary), state_of(standby))
    assert {shipped[0].regions[r].dtype for r in primary.layout.region_indices(PARAM)} == {torch.bfloat16}


def test_a_standby_that_skips_or_doubles_an_update_is_detected(start_server, connect):
    """Negative control: a fresh copy replaying the primary's updates matches; one skipped or doubled does not."""
    primary = start_server(mode="async", workers=1, optimizer="sgd", momentum=0.9, lr=0.05)
    updates = []
    replicas = {name: start_server(mode="async", workers=1, optimizer="sgd", momentum=0.9, lr=0.05)
                for name in ("faithful", "skips", "doubles")}
    primary.engine.on_published = updates.append  # what a standby receives
    client = connect(primary.port)
    client.join(name="w")
    for step in range(4):
        client.push(GRAD, step, gradient(client, step), 2, 0.5)

    def replay(server, plan):
        for version, update in enumerate(plan, start=1):
            copy = type(update)(version, [t.clone() for t in update.regions], update.share, update.entries,
                                update.loss, update.pushes, update.extra)
            server.engine.apply_replicated(copy)

    replay(replicas["faithful"], updates)
    replay(replicas["skips"], updates[:2] + updates[3:] + updates[3:])  # the same number of versions
    replay(replicas["doubles"], updates[:2] + [updates[1]] + updates[3:])
    reference = state_of(primary)
    assert same_state(reference, state_of(replicas["faithful"]))
    for name in ("skips", "doubles"):
        other = state_of(replicas[name])
        other["ledger"] = reference["ledger"]  # the weights alone must give it away
        assert not same_state(reference, other), name
    with pytest.raises(ValueError, match="gap or a repeat"):
        replicas["faithful"].engine.apply_replicated(updates[0])


class StalledStandby:
    """Follows a primary over the real Follow RPC, reads everything, and acks nothing after its hello."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.acks: queue.Queue = queue.Queue()
        self.acks.put(pb.ReplicaAck(version=0, standby_address="127.0.0.1:1", term=0))
        follow = self.channel.stream_stream("/paramhub.v1.Replication/Follow",
                                            request_serializer=pb.ReplicaAck.SerializeToString,
                                            response_deserializer=lambda raw: raw)
        self.call = follow(iter(self.acks.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass  # the primary ended the stream (detached us) or we cancelled it

    def close(self):
        self.acks.put(None)
        self.call.cancel()
        self.channel.close()


def test_with_acks_stalled_no_pull_or_async_reply_sees_the_version_until_the_bound(start_server, connect):
    primary = start_server(mode="async", workers=1, replication_timeout=2.0)
    stalled = StalledStandby(primary.port)
    try:
        wait_for(lambda: primary.replicator.state == "attached", 10, "attached")
        pusher, puller = connect(primary.port), connect(primary.port)
        pusher.join(name="w")
        puller.join(name="reader", observer=True)
        replies, pulled = [], []
        push = threading.Thread(target=lambda: replies.append(pusher.push(GRAD, 0, gradient(pusher, 1), 1, 0.1)))
        push.start()
        wait_for(lambda: primary.store.version == 1, 10, "applied on the primary")
        regions = puller.info.layout.empty_regions()
        pull = threading.Thread(target=lambda: pulled.append(puller.pull(regions, min_version=1)))
        pull.start()
        push.join(timeout=1.0)
        pull.join(timeout=0.2)
        assert not replies and not pulled, "version 1 was seen before the standby acked it"
        assert primary.replicator.state == "attached"
        push.join(timeout=10)
        pull.join(timeout=10)
        assert replies[0].version == 1 and pulled[0].version == 1  # released by the bound
        assert primary.replicator.state == "unprotected"
        assert primary.servicer.status().standby_state == "unprotected"
    finally:
        stalled.close()


def test_failover_the_client_moves_to_the_promoted_standby_and_its_retry_is_not_doubled(start_server, connect):
    primary, standby = start_pair(start_server, mode="async", workers=1, failover_after=1.0)
    from paramhub.worker.client import PSClient

    client = PSClient(f"127.0.0.1:{primary.port}", fast_timeouts(connect=20), failover=f"127.0.0.1:{standby.port}",
                      switch_after=0.5)
    try:
        client.join(name="w")
        for step in range(3):
            client.push(GRAD, step, gradient(client, step), 1, 0.1)
        wait_for(lambda: standby.store.version == 3, 10, "replicated")
        # the reply of push 3 is lost with the primary: the client retries it, with its sequence, on the standby
        sequence = client._sequence
        with pytest.raises(ServerUnreachable, match="is a standby"):  # while following, it refuses workers
            connect(standby.port, connect=0.3).join(name="x")
        primary.shutdown(grace=0)
        client._sequence = sequence - 1  # send push 3 again, as if its reply never came
        reply = client.push(GRAD, 2, gradient(client, 2), 1, 0.1)
        assert reply.version == 3 and client.address == f"127.0.0.1:{standby.port}"
        assert standby.store.version == 3, "the retried push was applied twice"
        assert standby.role.term == 2 and client.max_term == 2
        assert client.push(GRAD, 3, gradient(client, 3), 1, 0.1).version == 4
        entries = list(standby.engine.ledger.entries)
        assert [e.version for e in entries] == [1, 2, 3, 4]
        assert len({(e.worker_id, e.sequence) for e in entries}) == 4
    finally:
        client.close()


def test_a_restarted_primary_refuses_to_serve_once_its_standby_took_over(start_server, tmp_path):
    primary, standby = start_pair(start_server, mode="async", workers=1, failover_after=0.5,
                                  checkpoint_dir=str(tmp_path / "primary"), standby_dir=str(tmp_path / "standby"))
    port = primary.port
    primary.shutdown(grace=0)
    wait_for(lambda: standby.follower.promoted.is_set(), 10, "promoted")
    from paramhub.ps.server import PSServer

    again = PSServer(ServerConfig(host="127.0.0.1", port=port, model="mlp", num_classes=4, mode="async",
                                  timeouts=fast_timeouts(), checkpoint_dir=str(tmp_path / "primary")))
    with pytest.raises(Fenced, match="took over"):
        again.start()


def test_status_ps_ctl_and_metrics_show_roles_terms_and_the_standby(start_server):
    from paramhub.tools.ctl import status_table

    primary, standby = start_pair(start_server, mode="async", workers=1, metrics_port=0)
    shown = primary.servicer.status()
    assert (shown.role, shown.term, shown.standby_state) == ("primary", 1, "attached")
    assert "standby attached" in status_table(shown)
    following = standby.servicer.status()
    assert (following.role, following.standby_state, following.primary) == (
        "standby", "following", f"127.0.0.1:{primary.port}")
    assert "STANDBY of" in status_table(following)
    sample = primary.metrics.prometheus.get_sample_value
    wait_for(lambda: sample("paramhub_standby_attached") == 1, 5, "attached gauge")
    assert sample("paramhub_replication_lag_versions") == 0
    assert sample("paramhub_replication_bytes_total") > 0  # the snapshot
    primary.shutdown(grace=0)
    wait_for(lambda: standby.follower.promoted.is_set(), 15, "promoted")
    assert standby.metrics.prometheus.get_sample_value("paramhub_failovers_total") == 1
    taken_over = standby.servicer.status()
    assert (taken_over.role, taken_over.term, taken_over.failovers) == ("primary", 2, 1)


def test_partitions_each_with_a_standby_fail_over_one_by_one(start_server):
    """--partition k/2 servers, each followed by its own standby; the worker's PartitionedClient follows both."""
    from paramhub.worker.client import PSClient
    from paramhub.worker.partitions import PartitionedClient

    pairs = [start_pair(start_server, mode="async", workers=1, partition=(k, 2), failover_after=0.5)
             for k in range(2)]
    client = PartitionedClient([PSClient(f"127.0.0.1:{p.port}", fast_timeouts(connect=20),
                                         failover=f"127.0.0.1:{s.port}", switch_after=0.3) for p, s in pairs])
    try:
        info = client.join(name="w")
        regions = info.layout.empty_regions()
        for step in range(2):
            client.wait_and_pull(regions, step)
            client.push(GRAD, step, gradient(client, step), 1, 0.1)
        pairs[0][0].shutdown(grace=0)  # partition 0's primary dies; partition 1's goes on
        for step in range(2, 4):
            client.wait_and_pull(regions, step)
            assert client.push(GRAD, step, gradient(client, step), 1, 0.1).outcome == pb.PUSH_OUTCOME_ACCEPTED
        assert pairs[0][1].role.role == "primary" and pairs[1][1].role.role == "standby"
        assert pairs[0][1].store.version == pairs[1][0].store.version == 4
        wait_for(lambda: pairs[1][1].store.version == 4, 10, "partition 1's standby caught up")
        assert same_state(state_of(pairs[1][0]), state_of(pairs[1][1]))
    finally:
        client.close()


def test_the_worker_wants_one_standby_per_server_address_and_the_server_a_bounded_failover():
    from click.testing import CliRunner

    from paramhub.worker.cli import main

    result = CliRunner().invoke(main, ["--server", "127.0.0.1:1,127.0.0.1:2", "--failover", "127.0.0.1:3"])
    assert result.exit_code == 2 and "one standby per --server address" in result.output
    with pytest.raises(ValueError, match="--failover-after"):
        ServerConfig(failover_after=0)


def test_a_promoted_standby_continues_the_epochs_of_data_leases_exactly(start_server):
    """The done positions ride with each replicated update: after a failover the standby leases out exactly
    the positions its primary had not applied, and the epoch ends with every position done once."""
    from paramhub.common.leases import Span
    from paramhub.worker.client import PSClient

    primary, standby = start_pair(start_server, mode="async", workers=1, failover_after=1.0, data_leases=True,
                                  lease_size=4, epochs=1)
    ask = {"dataset_samples": 12, "dataset_fingerprint": "fp", "lease_samples_wanted": 4}
    client = PSClient(f"127.0.0.1:{primary.port}", fast_timeouts(connect=20), failover=f"127.0.0.1:{standby.port}",
                      switch_after=0.5)
    try:
        client.join(name="w")
        regions = client.info.layout.empty_regions()
        trained = []
        for step in range(2):  # positions 0..3, then 4..7, applied and replicated
            header = client.pull(regions, step, leases=ask)
            spans = [Span(r.epoch, r.start, r.end) for r in header.leases]
            client.push(GRAD, step, gradient(client, step), 4, 0.1, trained=spans)
            trained += spans
        wait_for(lambda: standby.store.version == 2, 10, "replicated")
        assert [(e.done, e.pending) for e in standby.engine.leases.summary()] == [(8, 4)]
        primary.shutdown(grace=0)
        header = client.pull(regions, 2, leases=ask)  # on the promoted standby
        assert client.address == f"127.0.0.1:{standby.port}"
        assert [(r.epoch, r.start, r.end) for r in header.leases] == [(0, 8, 12)]  # only what was not applied
        client.push(GRAD, 2, gradient(client, 2), 4, 0.1, trained=[Span(0, 8, 12)])
        wait_for(lambda: standby.store.done, 10, "the epoch complete on the standby")
        assert standby.engine.leases.completed == 1
    finally:
        client.close()


def test_a_standby_that_acks_a_version_it_was_never_sent_is_detached(start_server, connect):
    """An ack is bounded by what was streamed: a peer acking the future would open the durability gate for
    versions no standby holds. It is detached instead, and the primary says it runs unprotected."""
    primary = start_server(mode="async", workers=1, replication_timeout=30.0)
    liar = StalledStandby(primary.port)
    try:
        wait_for(lambda: primary.replicator.state == "attached", 10, "attached")
        liar.acks.put(pb.ReplicaAck(version=1_000_000))
        wait_for(lambda: primary.replicator.state == "unprotected", 10, "the lying standby detached")
        assert primary.replicator.acked == 0
    finally:
        liar.close()


def test_the_same_ack_of_what_was_sent_keeps_the_standby(start_server, connect):
    """The control: an ack of the snapshot's version (what it was sent) keeps the standby attached."""
    primary = start_server(mode="async", workers=1, replication_timeout=30.0)
    honest = StalledStandby(primary.port)
    try:
        wait_for(lambda: primary.replicator.state == "attached", 10, "attached")
        honest.acks.put(pb.ReplicaAck(version=0))
        time.sleep(0.5)  # nothing to wait for: the point is that no detach follows
        assert primary.replicator.state == "attached"
    finally:
        honest.close()
