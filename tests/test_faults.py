"""Faults with real processes and signals: dead workers, a crashed server, SIGTERM, cut streams."""

from __future__ import annotations

import collections
import contextlib
import pathlib
import re
import select
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from conftest import fast_timeouts, wait_for
from netns import Host, require_netns
from paramhub.common import codec
from paramhub.common.checkpoint import list_checkpoints, load_checkpoint
from paramhub.common.config import Timeouts
from paramhub.common.layout import BUFFER
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.ledger import Ledger
from paramhub.tools.cluster import LocalCluster
from paramhub.worker.client import PSClient
from scripted_worker import fixed_gradients, run_round

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SCRIPTED_WORKER = pathlib.Path(__file__).with_name("scripted_worker.py")
WORKER_ARGS = ("--image-size", "8", "--batch-size", "8", "--synthetic-size", "256", "--log-every", "1",
               "--connect-timeout", "60")


def wait_for_version(address: str, version: int, timeout: float = 120) -> int:
    """Polls the server's Status until it reaches ``version`` (bounded)."""
    deadline = time.monotonic() + timeout
    with PSClient(address, Timeouts(rpc=5, connect=10)) as client:
        while time.monotonic() < deadline:
            status = client.status()
            if status.version >= version:
                return status.version
            time.sleep(0.05)
    raise TimeoutError(f"server did not reach version {version} in {timeout}s")


def ledger_of(ckpt_dir) -> Ledger:
    _, server_state, _ = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
    return Ledger.from_tensors(server_state)


def read_line(stream, timeout: float) -> str:
    """One line from a child's stdout pipe, waiting at most ``timeout`` seconds for it."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line from the child within {timeout}s")
    return stream.readline()


@contextlib.contextmanager
def heartbeating(client: PSClient, every: float = 0.25):
    """Renews the client's lease from a thread, as a real worker does while its push waits for a round."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            client.heartbeat()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_a_worker_killed_mid_push_does_not_stop_a_sync_run(start_server, connect, caplog):
    """A worker process SIGKILLed in the middle of a 14-chunk push, once the server holds part of it.

    The server logs the cut stream with the bytes it had received of the push's, applies none of
    it (the weights stay those of the last round, then become exactly the survivor's step alone),
    the worker's lease expires and the run finishes. The kill comes from the test (the victim is
    ``scripted_worker.py``), not from a hook in the production worker.
    """
    lr, rounds_before_cut = 0.5, 3
    server = start_server(workers=2, lr=lr, max_steps=5, chunk_bytes=1024, metrics_port=0,
                          timeouts=fast_timeouts(lease=2.0, round=120))
    survivor = connect(server.port)
    survivor.join("w0")
    layout = survivor.info.layout
    assert layout.region_indices(BUFFER) == []  # every region goes through SGD: the reference below is exact
    received = lambda: server.metrics.prometheus.get_sample_value("paramhub_received_bytes_total")  # noqa: E731
    weights = [t.clone() for t in server.store.snapshot().regions]

    def sgd(weights, *grads):  # the server's sync step: the mean of one-sample pushes, plain SGD
        return [torch.add(w, sum(parts) / len(parts), alpha=-lr) for w, *parts in zip(weights, *grads)]

    victim = subprocess.Popen([sys.executable, str(SCRIPTED_WORKER), f"127.0.0.1:{server.port}", "1",
                               str(rounds_before_cut)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with heartbeating(survivor):
            for version in range(rounds_before_cut):  # each round closes once the victim's push is in too
                assert run_round(survivor, 0, version) == (version + 1, False)
                weights = sgd(weights, fixed_gradients(layout, 0, version), fixed_gradients(layout, 1, version))
            _, sent, total = read_line(victim.stdout, timeout=60).split()
            sent, total = int(sent), int(total)
            assert total == layout.nbytes and 0 < sent < total and total // 1024 >= 10  # many chunks, half sent
            # the victim is blocked mid-stream: kill it once the server has read what it sent
            wait_for(lambda: received() >= 2 * rounds_before_cut * total + sent, 30, "server never got the half")
            victim.kill()
            assert victim.wait(timeout=10) == -signal.SIGKILL
            # gRPC Python may end the request iterator of a call whose client died before it marks the
            # call cancelled (6 runs of 14 here): the stream then "ended short" instead of being
            # "abandoned midway". Both log what had arrived; neither applies it.
            cut_log = re.compile(r"push 4 of w1 (?:abandoned midway|ended short) after (\d+) of (\d+) payload bytes")
            wait_for(lambda: cut_log.search(caplog.text), 10, "the cut push was not logged")
            numbers = [int(n) for n in cut_log.search(caplog.text).groups() if n is not None]
            assert numbers == [sent, total], caplog.text
            assert server.store.version == rounds_before_cut
            assert all(torch.equal(a, b) for a, b in zip(server.store.snapshot().regions, weights))
            # the survivor's next round closes without the victim, once its lease expires: its step alone
            assert run_round(survivor, 0, rounds_before_cut) == (rounds_before_cut + 1, False)
            weights = sgd(weights, fixed_gradients(layout, 0, rounds_before_cut))
            assert all(torch.equal(a, b) for a, b in zip(server.store.snapshot().regions, weights))
            assert run_round(survivor, 0, rounds_before_cut + 1) == (rounds_before_cut + 2, True)  # to its end
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=10)
    victim_id = next(r.worker_id for r in server.registry.trainers() if r.name == "w1")
    assert re.search(rf"worker w1 \(id {victim_id}\) lost", caplog.text)
    ledger = server.engine.ledger
    workers_by_version = {v: sorted(e.worker_id for e in ledger.entries if e.version == v) for v in range(1, 6)}
    both = sorted([survivor.info.worker_id, victim_id])
    assert workers_by_version == {1: both, 2: both, 3: both, 4: [survivor.info.worker_id],
                                  5: [survivor.info.worker_id]}
    assert ledger.applied_per_worker[victim_id] == rounds_before_cut  # never the cut fourth push


def test_server_killed_and_resumed_loses_and_doubles_no_update(tmp_path):
    ckpt = tmp_path / "ckpt"
    server_args = ("--model", "mlp", "--num-classes", "4", "--workers", "2", "--max-steps", "30",
                   "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep-checkpoints", "3")
    with LocalCluster(tmp_path / "run") as cluster:
        port = cluster.start_server(*server_args)
        for shard in (0, 1):
            cluster.start_worker(shard, *WORKER_ARGS)
        wait_for_version(cluster.address, 10)
        cluster.kill_server()  # kill -9: no final checkpoint
        crashed_at = max(int(p.name[6:15]) for p in list_checkpoints(ckpt))
        cluster.start_server(*server_args, "--resume", port=port)
        codes = cluster.wait(timeout=240)
        logs = {name: cluster.read_log(name) for name in codes}
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, logs
    assert "resuming from" in logs["server"]
    assert "joining again" in logs["worker0"] + logs["worker1"]
    ledger = ledger_of(ckpt)
    per_version = collections.Counter(e.version for e in ledger.entries)
    assert sorted(per_version) == list(range(1, 31))  # no version lost
    assert set(per_version.values()) == {2}  # every sync round exactly one push per worker: none doubled
    ids = {int(i) for i in re.findall(r"worker shard-\d joined \(id (\d+)", logs["server"])}
    assert len(ids) == 2 and all({e.worker_id for e in ledger.entries if e.version == v} == ids for v in per_version)
    assert crashed_at >= 5  # the crash came mid-run (the newest checkpoint may trail the live version by one)


def test_sigterm_finishes_in_flight_work_checkpoints_and_workers_ride_through_a_restart(tmp_path):
    ckpt = tmp_path / "ckpt"
    server_args = ("--model", "mlp", "--num-classes", "4", "--workers", "2", "--max-steps", "25",
                   "--checkpoint-dir", str(ckpt))
    with LocalCluster(tmp_path / "run") as cluster:
        port = cluster.start_server(*server_args)
        for shard in (0, 1):
            cluster.start_worker(shard, *WORKER_ARGS)
        wait_for_version(cluster.address, 8)
        cluster.server.send_signal(signal.SIGTERM)
        assert cluster.server.wait(timeout=60) == 0
        stopped_at = max(int(p.name[6:15]) for p in list_checkpoints(ckpt))
        assert stopped_at >= 8  # the final checkpoint holds everything applied
        cluster.start_server(*server_args, "--resume", port=port)
        codes = cluster.wait(timeout=240)
        logs = {name: cluster.read_log(name) for name in codes}
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, logs
    per_version = collections.Counter(e.version for e in ledger_of(ckpt).entries)
    assert sorted(per_version) == list(range(1, 26)) and set(per_version.values()) == {2}


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, start_server):
    ckpt = tmp_path / "ckpt"
    server = start_server(checkpoint_dir=str(ckpt), keep_checkpoints=5)
    client = PSClient(f"127.0.0.1:{server.port}", fast_timeouts())
    client.join("w")
    grad = [torch.ones(client.info.layout.regions[0].numel)]
    for _ in range(3):
        client.push(pb.PUSH_KIND_GRADIENT, server.store.version, grad, num_samples=1, loss=0.0)
        server.checkpoint()
    client.close()
    newest = list_checkpoints(ckpt)[-1]
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the tensor data: only the checksum notices
    newest.write_bytes(bytes(data))
    resumed = start_server(checkpoint_dir=str(ckpt), resume=True)
    assert resumed.store.version == 2
    newest.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert start_server(checkpoint_dir=str(ckpt), resume=True).store.version == 2


def test_an_interrupted_push_leaves_no_trace(start_server, connect):
    server = start_server(workers=1, lr=1.0)
    client = connect(server.port)
    client.join("w")
    layout = client.info.layout
    before = server.store.snapshot().regions[0].clone()
    grad = torch.ones(layout.regions[0].numel)
    chunks = list(codec.encoded_chunks(layout, [grad], chunk_bytes=256))
    info = client.info
    header = pb.PushMessage(header=pb.PushHeader(
        worker_id=info.worker_id, incarnation=info.incarnation, sequence=1, base_version=0,
        kind=pb.PUSH_KIND_GRADIENT, layout_hash=layout.hash, num_samples=1, loss=0.0))

    class Cut(Exception):
        pass

    def cut_stream():
        yield header
        yield from chunks[: len(chunks) // 2]
        raise Cut  # the client's stream breaks off midway

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        push = channel.stream_unary("/paramhub.v1.ParameterServer/Push", request_serializer=codec.encode_message,
                                    response_deserializer=pb.PushResponse.FromString)
        with pytest.raises(grpc.RpcError):
            push(cut_stream(), timeout=10)
        assert server.store.version == 0 and torch.equal(server.store.snapshot().regions[0], before)
        reply = push(iter([header] + chunks), timeout=10)  # the same push, whole, is then applied once
    assert reply.version == 1
    torch.testing.assert_close(server.store.snapshot().regions[0], before - 1.0)


def test_a_worker_cut_off_by_the_network_is_lost_while_the_others_go_on(tmp_path):
    require_netns()
    host = Host(7)
    try:
        with LocalCluster(tmp_path / "run") as cluster:
            cluster.start_server("--host", "0.0.0.0", "--insecure", "--model", "mlp", "--num-classes", "4",
                                 "--workers", "3", "--max-steps", "20", "--lease-timeout", "2",
                                 "--checkpoint-dir", str(tmp_path / "ckpt"))
            cluster.start_worker(0, *WORKER_ARGS)
            cluster.start_worker(1, *WORKER_ARGS)
            remote = cluster.start_worker(2, "--image-size", "8", "--batch-size", "8", "--synthetic-size", "256",
                                          "--connect-timeout", "5", "--rpc-timeout", "3",
                                          server=f"{host.gateway}:{cluster.port}", wrapper=host.wrapper)
            wait_for_version(cluster.address, 4)
            host.cut()
            assert remote.wait(timeout=120) != 0  # it gives up once the server stays unreachable
            cluster.workers.remove(remote)
            codes = cluster.wait(timeout=180)
            server_log = cluster.read_log("server")
    finally:
        host.remove()
    assert codes == {"server": 0, "worker0": 0, "worker1": 0}, server_log
    remote_id = int(re.search(r"worker shard-2 joined \(id (\d+)", server_log).group(1))
    assert f"shard-2 (id {remote_id}) lost" in server_log
    ledger = ledger_of(tmp_path / "ckpt")
    assert sorted({e.version for e in ledger.entries}) == list(range(1, 21))
    assert ledger.applied_per_worker[remote_id] >= 3
