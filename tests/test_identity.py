"""Who may join, what Status shows however many came and went, Leave is final, finished runs end.

In-process servers (port 0) driven through raw stubs, so each test says exactly
what a peer sent; one subprocess test runs the real ps-server on a finished run.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from click.testing import CliRunner

from conftest import fast_timeouts, wait_for
from paramhub.common import codec
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc
from paramhub.ps.identity import MAX_NAME_CHARS, printable
from paramhub.tools import ctl

pytestmark = pytest.mark.timeout(120)
GRAD = pb.PUSH_KIND_GRADIENT


@pytest.fixture
def stub_for():
    """Raw ParameterServer stubs on plain channels, closed after the test."""
    channels = []

    def make(port: int) -> pb_grpc.ParameterServerStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return pb_grpc.ParameterServerStub(channel)

    yield make
    for channel in channels:
        channel.close()


def join(stub, name: str, incarnation: int = 1, **fields) -> pb.JoinResponse:
    return stub.Join(pb.JoinRequest(worker_name=name, incarnation=incarnation, **fields), timeout=10)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def push(port: int, reply: pb.JoinResponse, incarnation: int, sequence: int, base_version: int,
         value: float = 1.0) -> pb.PushResponse:
    """A full gradient push of ``value`` everywhere from the worker that got ``reply`` at Join."""
    from paramhub.common.layout import Layout

    layout = Layout.from_proto(reply.layout)
    regions = [torch.full((spec.numel,), value, dtype=spec.dtype) for spec in layout.regions]
    header = pb.PushHeader(worker_id=reply.worker_id, incarnation=incarnation, sequence=sequence,
                           base_version=base_version, kind=GRAD, layout_hash=layout.hash, num_samples=1, loss=0.5)
    messages = [pb.PushMessage(header=header)] + list(codec.encoded_chunks(layout, regions))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_unary("/paramhub.v1.ParameterServer/Push", request_serializer=codec.encode_message,
                                    response_deserializer=pb.PushResponse.FromString)
        return call(iter(messages), timeout=10)


def weights(server) -> list[torch.Tensor]:
    return [r.clone() for r in server.store.snapshot().regions]


# -- names ------------------------------------------------------------------------------

REALISTIC_NAMES = [
    "",  # the server names it worker-<id>
    "shard-0", "shard-17",  # ps-worker's default, shard-<i>
    "paramhub-worker-3", "job-worker-0-0.svc", "trainer-7d9f8c6b5-x2kqz",  # Kubernetes pods and services
    "deploy-worker-1", "deploy_worker_1",  # docker-compose container names (v2 and v1)
    "ip-10-0-0-12.ec2.internal", "gpu-node-04.cluster.local", "shard-0@host", "host:50051", "Worker.A_b-c:d@e",
    "a" * MAX_NAME_CHARS,
]

HOSTILE_NAMES = {
    "too long": "a" * (MAX_NAME_CHARS + 1),
    "a megabyte": "w" * (1 << 20),
    "newline": "w0\n2026-01-01 00:00:00 INFO [server] fake line",
    "carriage return": "w0\rfake",
    "tab": "w\t0",
    "NUL": "w\x000",
    "terminal escape": "w\x1b[2Jw",
    "Cyrillic lookalike": "w\u043erker-0",  # worker-0 with a Cyrillic o
    "fullwidth digit": "shard-\uff10",
    "space": "shard 0",
    "zero-width space": "shard\u200b-0",
}


@pytest.mark.parametrize("name", REALISTIC_NAMES)
def test_realistic_names_are_accepted(start_server, stub_for, name):
    server = start_server()
    reply = join(stub_for(server.port), name)
    (record,) = server.registry.trainers()
    assert record.worker_id == reply.worker_id
    assert record.name == (name or f"worker-{reply.worker_id}")


@pytest.mark.parametrize("kind", HOSTILE_NAMES)
def test_hostile_names_are_refused_with_invalid_argument(start_server, stub_for, kind):
    server = start_server()
    stub = stub_for(server.port)
    error = refused(lambda: join(stub, HOSTILE_NAMES[kind]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker name" in error.details() and len(error.details()) < 400  # never echoes a megabyte back
    assert server.registry.trainers() == []  # nothing was registered
    assert join(stub, "shard-0").worker_id  # the same server takes a plain name (the refusal is about the name)


def test_a_shard_below_minus_one_is_refused(start_server, stub_for):
    server = start_server()
    stub = stub_for(server.port)
    assert refused(lambda: join(stub, "w", shard=-2)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert join(stub, "w", shard=-1).worker_id and join(stub, "v", shard=3).worker_id  # control


# -- log lines ----------------------------------------------------------------------------

def test_printable_escapes_what_could_forge_a_line():
    assert printable("shard-0@host") == "shard-0@host"  # plain names read as they are
    assert printable("w0\nINFO fake") == "w0\\nINFO fake"
    assert printable("w\x1b[2J\r") == "w\\x1b[2J\\r"
    assert printable("w\u043e") == "w\\u043e"
    assert printable(printable("w0\n\u043e")) == printable("w0\n\u043e")  # once is enough
    long = printable("x" * 1000, limit=50)
    assert long.startswith("x" * 50) and long.endswith("(950 more)")


def test_a_peer_provided_name_cannot_start_a_log_line(start_server, stub_for, caplog):
    """A name from an old checkpoint (not checked at Join) reaches the lease-expiry log line escaped."""
    server = start_server(timeouts=fast_timeouts(lease=0.2))
    evil = "w0\n2026-01-01 00:00:00 WARNING [server] forged line"
    caplog.set_level(logging.INFO, logger="paramhub.ps")
    server.registry.restore([{"worker_id": 1, "name": evil, "incarnation": 1, "shard": 0, "observer": False,
                              "pushes_accepted": 0, "pushes_dropped": 0, "last_base_version": 0}])
    join(stub_for(server.port), "shard-1")  # a plain name: logged as it is
    lost = wait_for(lambda: [r for r in caplog.records if "lost" in r.getMessage()], what="a lost-worker line")
    messages = [r.getMessage() for r in caplog.records]
    assert any("shard-1 joined" in m for m in messages)
    assert all("\n" not in m and "\r" not in m for m in messages)
    assert "w0\\n2026-01-01" in lost[0].getMessage()  # escaped, still readable
    # negative control: the raw name would have made a line of its own
    assert len(f"worker {evil} (id 1) lost".splitlines()) == 2


# -- Status stays bounded ---------------------------------------------------------------------

def test_status_stays_bounded_with_a_full_registry_of_maximal_names(start_server, stub_for):
    """The worst case at the defaults: every live place taken and more departures than are kept, long names."""
    server = start_server()
    keep, live_cap, departed = server.config.keep_departed, server.config.max_live_workers, 200
    assert (keep, live_cap) == (128, 1024)
    stub = stub_for(server.port)
    limit = server.config.chunk_bytes + codec.MESSAGE_OVERHEAD_BYTES
    for i in range(departed):  # each joins and leaves: only the `keep` most recent are remembered
        reply = join(stub, f"gone-{i:04d}-".ljust(MAX_NAME_CHARS, "x"))
        stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, incarnation=1), timeout=10)
    for i in range(live_cap):
        join(stub, f"live-{i:04d}-".ljust(MAX_NAME_CHARS, "y"))
    refusal = refused(lambda: join(stub, "one-too-many"))
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-live-workers" in refusal.details()

    status = stub.Status(pb.StatusRequest(), timeout=10)
    assert (status.live_workers, status.departed_workers, status.workers_not_listed) == (
        live_cap, departed, departed - keep)
    listed_live = [w for w in status.workers if w.alive]
    listed_gone = [w for w in status.workers if not w.alive]
    assert len(listed_live) == live_cap and all(w.worker_name.startswith("live-") for w in listed_live)
    # the most recent departures, newest first, marked as having left (not lost)
    assert [w.worker_name[:9] for w in listed_gone] == [f"gone-{i:04d}" for i in range(departed - 1,
                                                                                       departed - keep - 1, -1)]
    assert all(w.left for w in listed_gone)
    assert len(server.registry.trainers()) == live_cap + keep  # the forgotten ones are gone from memory
    # a long run's larger counters add at most 60 bytes a worker (full varints and doubles, measured)
    assert status.ByteSize() + (live_cap + keep) * 64 < limit / 4

    result = CliRunner().invoke(ctl.main, ["status", f"127.0.0.1:{server.port}"])
    assert result.exit_code == 0, result.output
    assert f"{live_cap} live, {departed} departed; {departed - keep} not listed" in result.output
    rows = result.output.splitlines()
    assert sum(" alive " in row for row in rows) == live_cap and sum(" left " in row for row in rows) == keep

    stub.Leave(pb.LeaveRequest(worker_id=listed_live[0].worker_id, incarnation=1), timeout=10)
    assert join(stub, "one-too-many").worker_id  # a place came free: the cap counts live leases only


def test_status_fits_one_message_even_with_small_chunks(start_server, stub_for):
    """With chunks far smaller than the worker list, Status lists the live workers first and counts the rest."""
    server = start_server(chunk_bytes=4096, keep_departed=8)
    stub = stub_for(server.port)
    for i in range(60):
        join(stub, f"worker-{i:03d}-".ljust(MAX_NAME_CHARS, "z"))
    gone = join(stub, "left-early")
    stub.Leave(pb.LeaveRequest(worker_id=gone.worker_id, incarnation=1), timeout=10)
    status = stub.Status(pb.StatusRequest(), timeout=10)
    assert status.ByteSize() < 4096
    assert 0 < len(status.workers) < 60 and all(w.alive for w in status.workers)
    assert (status.live_workers, status.departed_workers) == (60, 1)
    assert status.workers_not_listed == 61 - len(status.workers)


# -- Leave is final --------------------------------------------------------------------------

def test_push_and_heartbeat_after_leave_are_refused_until_the_worker_joins_again(start_server, stub_for):
    server = start_server()
    stub = stub_for(server.port)
    reply = join(stub, "w0", incarnation=5)
    assert push(server.port, reply, 5, sequence=1, base_version=0).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert server.store.version == 1
    stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, incarnation=5), timeout=10)
    stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, incarnation=5), timeout=10)  # a repeat is fine
    before = weights(server)

    error = refused(lambda: push(server.port, reply, 5, sequence=2, base_version=1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "left; join again" in error.details()
    beat = pb.HeartbeatRequest(worker_id=reply.worker_id, incarnation=5)
    error = refused(lambda: stub.Heartbeat(beat, timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "left" in error.details()
    assert server.store.version == 1  # nothing applied, nothing revived
    for old, now in zip(before, weights(server)):
        torch.testing.assert_close(now, old, rtol=0, atol=0)
    (record,) = server.registry.trainers()
    assert not record.alive and record.left
    status = stub.Status(pb.StatusRequest(), timeout=10)
    assert (status.live_workers, status.departed_workers, status.workers[0].left) == (0, 1, True)

    again = join(stub, "w0", incarnation=5)  # the same incarnation joins again: admitted
    assert again.worker_id == reply.worker_id
    assert stub.Heartbeat(beat, timeout=10).version == 1
    assert push(server.port, again, 5, sequence=2, base_version=1).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert server.store.version == 2
    assert any(not torch.equal(old, now) for old, now in zip(before, weights(server)))

    stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, incarnation=5), timeout=10)
    restarted = join(stub, "w0", incarnation=6)  # or a newer one
    assert push(server.port, restarted, 6, sequence=1, base_version=2).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert server.store.version == 3


def test_a_worker_whose_lease_merely_expired_is_revived_by_its_push(start_server, stub_for):
    """The control for the test above: silence is not Leave; a late but alive worker carries on."""
    server = start_server(timeouts=fast_timeouts(lease=0.3))
    stub = stub_for(server.port)
    reply = join(stub, "slow", incarnation=1)
    wait_for(lambda: not server.registry.trainers()[0].alive, what="the lease to expire")
    status = stub.Status(pb.StatusRequest(), timeout=10)
    assert (status.workers[0].alive, status.workers[0].left) == (False, False)
    assert push(server.port, reply, 1, sequence=1, base_version=0).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert server.store.version == 1 and server.registry.trainers()[0].alive


def test_a_trainer_run_sends_nothing_after_its_leave(start_server, caplog):
    """The worker's own shutdown path: Leave is its last call, so no refusal is logged anywhere."""
    from conftest import train_in_threads
    from paramhub.common.config import WorkerConfig

    server = start_server(max_steps=3)
    serving = threading.Thread(target=server.run_until_done, daemon=True)
    serving.start()
    caplog.set_level(logging.DEBUG)
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", batch_size=4, image_size=8,
                          synthetic_size=16, timeouts=fast_timeouts(heartbeat=0.05))
    summaries = train_in_threads(config, workers=1)
    assert summaries[0].final_version == 3
    serving.join(timeout=20)
    assert not serving.is_alive()
    assert server.registry.trainers()[0].left
    assert not [r for r in caplog.records if "left; join again" in r.getMessage()]  # not even at DEBUG
    assert server.servicer.pushes_rejected == 0


# -- finished runs end -----------------------------------------------------------------------

def finished_checkpoint(start_server, stub_for, directory: pathlib.Path, versions: int,
                        names=("w0",)) -> list[torch.Tensor]:
    """A checkpoint at ``versions`` with the named workers on record (they never leave); returns its weights."""
    server = start_server(checkpoint_dir=str(directory), workers=len(names))
    stub = stub_for(server.port)
    replies = [join(stub, name) for name in names]
    for version in range(versions):
        for reply in replies:
            push(server.port, reply, 1, sequence=version + 1, base_version=version)
    assert server.store.version == versions
    server.checkpoint()
    final = weights(server)
    server.shutdown(grace=0)
    return final


def test_draining_a_resumed_run_waits_only_for_workers_of_this_process(start_server, stub_for, tmp_path):
    finished_checkpoint(start_server, stub_for, tmp_path, versions=1, names=("w0", "w1"))
    server = start_server(checkpoint_dir=str(tmp_path), resume=True, max_steps=2, workers=1,
                          timeouts=fast_timeouts(lease=30), done_grace_s=0.2)
    assert [r.alive for r in server.registry.trainers()] == [True, True]  # restored: alive, not joined
    serving = threading.Thread(target=server.run_until_done, daemon=True)
    serving.start()
    stub = stub_for(server.port)
    reply = join(stub, "w2")
    assert push(server.port, reply, 1, sequence=1, base_version=1).done
    stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, incarnation=1), timeout=10)
    started = time.monotonic()
    serving.join(timeout=10)
    assert not serving.is_alive() and time.monotonic() - started < 5  # not the 30 s lease of w0 and w1


def test_draining_still_waits_for_a_worker_of_this_process(start_server, stub_for):
    """The control: a worker that joined this process and has not left is waited for (bounded by its lease)."""
    server = start_server(max_steps=1, timeouts=fast_timeouts(lease=2), done_grace_s=0.2)
    serving = threading.Thread(target=server.run_until_done, daemon=True)
    serving.start()
    reply = join(stub_for(server.port), "w0")
    started = time.monotonic()
    assert push(server.port, reply, 1, sequence=1, base_version=0).done
    serving.join(timeout=15)
    assert not serving.is_alive() and time.monotonic() - started > 1.5


def ps_server(*args: str) -> list[str]:
    return [sys.executable, "-m", "paramhub.ps.cli", "--model", "mlp", "--num-classes", "4", "--momentum", "0",
            "--port", "0", "--lease-timeout", "30", *args]


@pytest.mark.timeout(90)
def test_ps_server_resuming_a_finished_run_exits_at_once_or_lingers(start_server, stub_for, tmp_path):
    from paramhub.worker.client import PSClient

    final = finished_checkpoint(start_server, stub_for, tmp_path / "ckpt", versions=2)
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    started = time.monotonic()
    done = subprocess.run(ps_server("--checkpoint-dir", ckpt, "--resume", "--max-steps", "2"),
                          capture_output=True, text=True, timeout=20, env=env)
    assert done.returncode == 0, done.stderr
    assert "run already complete: resumed at version 2, --max-steps 2; exiting" in done.stderr
    assert time.monotonic() - started < 20

    # --linger: serves the final model (health, Pull) until SIGTERM
    port_file = tmp_path / "port"
    lingering = subprocess.Popen(ps_server("--checkpoint-dir", ckpt, "--resume", "--max-steps", "2", "--linger",
                                           "--port-file", str(port_file)),
                                 stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(port_file.exists, timeout=30, what="the lingering server to listen")
        address = f"127.0.0.1:{int(port_file.read_text())}"
        assert ctl.health_status(address) == "SERVING"
        with PSClient(address, fast_timeouts()) as reader:
            regions = reader.join("reader", observer=True).layout.empty_regions()
            header = reader.pull(regions)
        assert (header.version, header.done) == (2, True)
        for got, expected in zip(regions, final):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert lingering.poll() is None, "the server exited although it should linger"
        lingering.send_signal(signal.SIGTERM)
        assert lingering.wait(timeout=15) == 0
        assert "serving the final model until stopped (--linger)" in lingering.stderr.read()
    finally:
        if lingering.poll() is None:
            lingering.kill()
            lingering.wait(timeout=5)

    # negative control: a run that is not finished keeps serving, waiting for its workers
    unfinished = subprocess.Popen(ps_server("--checkpoint-dir", ckpt, "--resume", "--max-steps", "3",
                                            "--port-file", str(port_file) + ".2"),
                                  stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(pathlib.Path(str(port_file) + ".2").exists, timeout=30, what="the unfinished server to listen")
        address = f"127.0.0.1:{int(pathlib.Path(str(port_file) + '.2').read_text())}"
        assert ctl.health_status(address) == "SERVING"
        assert unfinished.poll() is None
        unfinished.send_signal(signal.SIGTERM)
        assert unfinished.wait(timeout=15) == 0
        assert "run already complete" not in unfinished.stderr.read()
    finally:
        if unfinished.poll() is None:
            unfinished.kill()
            unfinished.wait(timeout=5)
