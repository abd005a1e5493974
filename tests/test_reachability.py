"""The server stays reachable under load and abuse: stream limits, busy pushback, stall guards.

Every open Push or Pull holds one of the server's handler threads. Clients that open
streams and send (or read) nothing must not take the threads that health checks,
Status, Join, Heartbeat and Leave need; a legitimate worker refused as busy backs off
and gets through once a slot frees. Attacks are raw gRPC streams on a real server
on port 0; the legitimate side is the real PSClient.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import fast_timeouts, wait_for

from paramhub.common import codec
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc
from paramhub.common.pushback import PUSHBACK_KEY
from paramhub.ps.limits import StreamLimits
from paramhub.ps.request_gate import OUTWAITED_S, RequestGate
from paramhub.worker.client import PSClient, ServerBusy

pytestmark = pytest.mark.timeout(90)
GRAD = pb.PUSH_KIND_GRADIENT
QUICK_S = 1.0  # health and Status must answer within this under the attack (they take milliseconds idle)


PUSH = "/paramhub.v1.ParameterServer/Push"
# unary-request methods: a stock client can open them as request streams that never yield
SILENT_METHODS = ("/paramhub.v1.ParameterServer/Pull", "/paramhub.v1.ParameterServer/Status",
                  "/grpc.health.v1.Health/Check")


class SilentCalls:
    """``n`` raw calls (of ``methods`` in turn) that send nothing, or one ``first`` message, then nothing."""

    def __init__(self, address: str, n: int, methods: tuple[str, ...] = (PUSH,), first: pb.PushMessage | None = None):
        self._release = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self.calls = [self._channel.stream_unary(methods[i % len(methods)], request_serializer=codec.encode_message)
                      .future(self._messages(first), timeout=60) for i in range(n)]

    def _messages(self, first):
        if first is not None:
            yield first
        self._release.wait(60)  # never ends on its own within a test

    def ended(self) -> list[grpc.RpcError]:
        """The calls that have ended (refused or cancelled by the server)."""
        return [call.exception() for call in self.calls if call.done()]

    def open(self) -> int:
        return sum(not call.done() for call in self.calls)

    def codes(self) -> collections.Counter:
        return collections.Counter(e.code() for e in self.ended())

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self._release.set()
        self._channel.close()


@pytest.fixture
def silent_calls():
    opened = []

    def open_calls(address: str, n: int, methods: tuple[str, ...] = (PUSH,), first=None) -> SilentCalls:
        opened.append(SilentCalls(address, n, methods, first))
        return opened[-1]

    yield open_calls
    for calls in opened:
        calls.close()


def timed(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def health_and_status_seconds(port: int, host: str = "127.0.0.1") -> tuple[float, float]:
    """How long a health check and a Status take on a fresh connection (deadline 5 s: over, they raise)."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = pb_grpc.ParameterServerStub(channel)
        check = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        return check, timed(lambda: status.Status(pb.StatusRequest(), timeout=5))


def push_header(client: PSClient, sequence: int = 1) -> pb.PushMessage:
    info = client.info
    return pb.PushMessage(header=pb.PushHeader(
        worker_id=info.worker_id, incarnation=info.incarnation, sequence=sequence, base_version=0, kind=GRAD,
        layout_hash=info.layout.hash, num_samples=1, loss=0.5))


def refused_streams_metric(port: int) -> dict[str, float]:
    """``paramhub_streams_refused_total`` by limit, as /metrics serves it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.labels["limit"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "paramhub_streams_refused_total"}


def push_in_thread(client: PSClient, gradient: list) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["reply"] = client.push(GRAD, 0, gradient, num_samples=1, loss=0.0)
        except Exception as exc:  # re-raised by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_100_silent_pushes_leave_health_and_status_quick_and_a_real_push_gets_in(start_server, connect,
                                                                                 silent_calls):
    """Default limits: one host may hold 64 streams; the other 36 are refused at once, threads stay free."""
    server = start_server(lr=1.0, timeouts=fast_timeouts(connect=20))
    limits = server.servicer.limits
    attack = silent_calls(f"127.0.0.1:{server.port}", 100)  # no header: nothing at all
    wait_for(lambda: limits.open == 64 and len(attack.ended()) == 36, what="64 held, 36 refused")

    check_s, status_s = health_and_status_seconds(server.port)
    client = connect(server.port, connect=20)
    join_s = timed(lambda: client.join("w"))
    assert attack.open() == 64, "the attack must still hold its streams while we measure"
    assert max(check_s, status_s, join_s) < QUICK_S, (check_s, status_s, join_s)
    error = attack.ended()[0]
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams-per-peer" in error.details()
    assert dict(error.trailing_metadata())[PUSHBACK_KEY] == "1000"

    # The real worker shares 127.0.0.1 with the attacker: it is refused, backs off, and gets in once
    # the attack's streams are gone.
    w0 = server.store.snapshot().regions[0].clone()
    gradient = torch.linspace(-1, 1, w0.numel())
    thread, result = push_in_thread(client, [gradient])
    wait_for(lambda: limits.refused["per_peer"] >= 37, what="the real push to be refused once")
    assert thread.is_alive() and server.store.version == 0
    attack.close()
    thread.join(30)
    assert "error" not in result, result.get("error")
    assert result["reply"].version == 1
    torch.testing.assert_close(server.store.snapshot().regions[0], w0 - gradient, rtol=0, atol=0)
    wait_for(lambda: limits.open == 0 and limits.open_by_peer() == {}, what="every slot back")


def test_the_total_limit_keeps_threads_for_unary_calls_against_pushes_that_stop_after_the_header(
        start_server, connect, silent_calls):
    server = start_server(rpc_threads=16, max_open_streams=8, max_streams_per_peer=100, metrics_port=0)
    limits = server.servicer.limits
    client = connect(server.port)
    client.join("w")
    attack = silent_calls(f"127.0.0.1:{server.port}", 100, first=push_header(client))
    wait_for(lambda: limits.open == 8 and len(attack.ended()) == 92, what="8 held, 92 refused")

    check_s, status_s = health_and_status_seconds(server.port)
    heartbeat_s = timed(client.heartbeat)
    assert attack.open() == 8
    assert max(check_s, status_s, heartbeat_s) < QUICK_S, (check_s, status_s, heartbeat_s)
    assert {e.code() for e in attack.ended()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("--max-open-streams" in e.details() for e in attack.ended())
    assert refused_streams_metric(server.metrics_port) == {"total": 92}
    attack.close()
    wait_for(lambda: limits.open == 0, what="every slot back")
    assert server.store.version == 0  # nothing of the attack was applied


@pytest.mark.parametrize("protected", [True, False], ids=["with-limits", "without-limits"])
def test_without_the_limits_the_same_attack_starves_health(start_server, silent_calls, protected):
    """The negative control: limits raised to the thread count, 12 silent streams take all 12 threads.

    Then health checks wait in the pool's queue until the stall guard (2 s here)
    cancels the streams, which is what the limits prevent.
    """
    server = start_server(rpc_threads=12, timeouts=fast_timeouts(stall=2.0))
    if not protected:
        # Deliberately broken: no config may leave streams every thread (ServerConfig refuses it).
        server.servicer.limits = StreamLimits(total=12, per_peer=12)
    held = server.servicer.limits.total
    attack = silent_calls(f"127.0.0.1:{server.port}", 12)
    wait_for(lambda: server.servicer.limits.open == held and attack.open() == held, what="the attack in place")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        def check():
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=QUICK_S)
        if protected:
            assert timed(check) < QUICK_S
        else:
            with pytest.raises(grpc.RpcError) as err:
                check()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: attack.open() == 0, timeout=10, what="the stall guard to cancel the attack")
    codes = collections.Counter(e.code() for e in attack.ended())
    assert codes == ({grpc.StatusCode.RESOURCE_EXHAUSTED: 8, grpc.StatusCode.CANCELLED: 4} if protected
                     else {grpc.StatusCode.CANCELLED: 12})
    wait_for(lambda: server.servicer.limits.open == 0, what="every slot back")
    assert max(health_and_status_seconds(server.port)) < QUICK_S


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) here: cannot make a second peer address")
def test_a_host_at_its_limit_does_not_hold_back_another_host(start_server, silent_calls):
    """127.0.0.1 and ::1 are two peers of a server on localhost: the attack from one, the worker from the other."""
    server = start_server(host="localhost", max_streams_per_peer=4, lr=1.0)
    limits = server.servicer.limits
    attack = silent_calls(f"127.0.0.1:{server.port}", 20)
    wait_for(lambda: limits.open == 4 and len(attack.ended()) == 16, what="4 held, 16 refused")
    with PSClient(f"[::1]:{server.port}", fast_timeouts()) as client:
        client.join("w")
        w0 = server.store.snapshot().regions[0].clone()
        gradient = torch.full_like(w0, 0.25)
        assert client.push(GRAD, 0, [gradient], num_samples=1, loss=0.0).version == 1
        regions = client.info.layout.empty_regions()
        client.pull(regions, min_version=1)
    torch.testing.assert_close(regions[0], w0 - gradient, rtol=0, atol=0)
    assert limits.refused == {"per_peer": 16}  # the worker on ::1 was never refused
    assert attack.open() == 4


def test_a_client_refused_for_longer_than_its_connect_timeout_gives_up_naming_the_cause(start_server, connect,
                                                                                      silent_calls):
    server = start_server(max_streams_per_peer=1, timeouts=fast_timeouts(stall=60))
    attack = silent_calls(f"127.0.0.1:{server.port}", 1)
    wait_for(lambda: server.servicer.limits.open == 1, what="the slot taken")
    client = connect(server.port, connect=2.5)
    client.join("w")
    start = time.monotonic()
    with pytest.raises(ServerBusy, match="busy for 2s"):
        client.pull(client.info.layout.empty_regions())
    assert 1.5 < time.monotonic() - start < 6
    assert server.servicer.limits.refused["per_peer"] >= 2  # it did retry
    assert attack.open() == 1


def big_mlp_server(start_server, **timeouts):
    """An mlp with 200,000 classes: 51 MB, many times the HTTP/2 window of a stream."""
    return start_server(num_classes=200_000, timeouts=fast_timeouts(**timeouts))


def test_a_pull_whose_client_never_reads_is_cancelled_after_the_stall_timeout(start_server, connect):
    server = big_mlp_server(start_server, stall=1.0)
    assert server.layout.nbytes > 40e6
    limits = server.servicer.limits
    with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                               options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        pull = channel.unary_stream("/paramhub.v1.ParameterServer/Pull",
                                    request_serializer=pb.PullRequest.SerializeToString,
                                    response_deserializer=codec.decode_pull_message)
        start = time.monotonic()
        stream = pull(pb.PullRequest(layout_hash=server.layout.hash), timeout=60)  # and never read
        wait_for(lambda: limits.open == 1, what="the pull to start")
        wait_for(lambda: limits.open == 0, timeout=15, what="the stall guard to cancel the pull")
        freed_after = time.monotonic() - start
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:  # what was in flight arrives, then the cancel
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
    assert 1.0 <= freed_after < 10, freed_after
    # The thread is free again and the next pull, read, is whole.
    client = connect(server.port)
    client.join("reader")
    regions = client.info.layout.empty_regions()
    client.pull(regions)
    torch.testing.assert_close(regions[0], server.store.snapshot().regions[0], rtol=0, atol=0)
    assert limits.open == 0


def test_a_pull_waiting_for_a_new_version_is_not_a_stall(start_server, connect):
    """The control of the test above: --pull-wait longer than --stall-timeout, the wait is not cut short."""
    server = start_server(timeouts=fast_timeouts(stall=0.5, pull_wait=2.0))
    client = connect(server.port)
    client.join("w")
    regions = client.info.layout.empty_regions()
    start = time.monotonic()
    header = client.pull(regions, min_version=1)  # nobody pushes: the server waits --pull-wait, then says so
    assert header.version == 0 and time.monotonic() - start >= 1.9
    wait_for(lambda: server.servicer.limits.open == 0, what="the slot back")  # released as the RPC ends
    assert server.servicer.limits.refused == {}


def without_the_gate(monkeypatch) -> None:
    """Deliberately broken: the gate passes every handler through, so grpc reads unary requests itself."""
    monkeypatch.setattr(RequestGate, "intercept_service", lambda self, continuation, details: continuation(details))


@pytest.mark.parametrize("protected", [True, False], ids=["with-gate", "without-gate"])
def test_calls_that_never_send_their_request_message_do_not_starve_health(start_server, silent_calls, monkeypatch,
                                                                          protected):
    """16 silent Pull, Status and health calls from one host, on 12 handler threads.

    With the gate, 4 wait (one host's share: half of the 8 threads not kept for calls that have
    their request) and 12 are refused at once; a health check and a Status from the same host,
    once those 4 have waited ``OUTWAITED_S``, answer at once (the first takes the place of one
    of them). The negative control: without it, the calls take every thread and health
    times out.
    """
    def handler_threads() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("ps-rpc")}

    if not protected:
        without_the_gate(monkeypatch)
    earlier = handler_threads()  # of servers of earlier tests: grpc leaves their pools alive
    server = start_server(rpc_threads=12, timeouts=fast_timeouts(stall=60, request=20))
    waits = server.request_waits
    attack = silent_calls(f"127.0.0.1:{server.port}", 16, SILENT_METHODS)
    if not protected:
        # the pool starts a thread only when all of its threads are busy: 12 means the calls hold them all
        wait_for(lambda: len(handler_threads() - earlier) == 12, timeout=10,
                 what="the calls to take every handler thread")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as probe:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=QUICK_S)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert attack.open() == 16 and waits.waiting == 0  # nothing of ours ran
        return
    wait_for(lambda: waits.waiting == 4 and len(attack.ended()) == 12, what="4 waiting, 12 refused")
    in_place = time.monotonic()
    refused = attack.ended()
    assert attack.codes() == {grpc.StatusCode.RESOURCE_EXHAUSTED: 12}
    assert all("waiting for their request message" in e.details() for e in refused)
    assert {dict(e.trailing_metadata())[PUSHBACK_KEY] for e in refused} == {"1000"}
    assert waits.refused == {"per_peer": 12}

    wait_for(lambda: time.monotonic() - in_place > OUTWAITED_S, what="the waiting calls to have outwaited")
    check_s, status_s = health_and_status_seconds(server.port)
    assert max(check_s, status_s) < QUICK_S, (check_s, status_s)
    # the health check took the place of one; the Status found a free one (3 of 4 taken)
    wait_for(lambda: attack.open() == 3, timeout=5, what="a waiting call to give its place")
    assert attack.codes() == {grpc.StatusCode.RESOURCE_EXHAUSTED: 12, grpc.StatusCode.CANCELLED: 1}
    assert waits.cancelled == {"outwaited": 1} and waits.waiting == 3


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) here: cannot make a second peer address")
def test_another_host_is_served_while_one_host_holds_its_places_until_the_request_timeout(start_server, connect,
                                                                                      silent_calls):
    """The attack from 127.0.0.1 keeps its 4 places (no one takes them: the total of 8 is not reached);
    health, Status and a worker's Join, Heartbeat and Pull from ::1 are served meanwhile; the
    attack's calls are cancelled once ``--request-timeout`` has passed."""
    server = start_server(host="localhost", rpc_threads=12, timeouts=fast_timeouts(stall=60, request=2.0))
    waits = server.request_waits
    opened = time.monotonic()
    attack = silent_calls(f"127.0.0.1:{server.port}", 16, SILENT_METHODS)
    wait_for(lambda: waits.waiting == 4 and len(attack.ended()) == 12, what="4 waiting, 12 refused")
    check_s, status_s = health_and_status_seconds(server.port, host="[::1]")
    with PSClient(f"[::1]:{server.port}", fast_timeouts()) as client:
        start = time.monotonic()
        client.join("w")
        client.heartbeat()
        regions = client.info.layout.empty_regions()
        client.pull(regions)
        worker_s = time.monotonic() - start
    torch.testing.assert_close(regions[0], server.store.snapshot().regions[0], rtol=0, atol=0)
    assert max(check_s, status_s, worker_s) < QUICK_S, (check_s, status_s, worker_s)
    assert attack.open() == 4 and waits.refused == {"per_peer": 12}  # all the while, and ::1 was never refused

    wait_for(lambda: attack.open() == 0, timeout=10, what="the request timeout to cancel the attack")
    assert 2.0 <= time.monotonic() - opened < 4.5
    assert attack.codes() == {grpc.StatusCode.RESOURCE_EXHAUSTED: 12, grpc.StatusCode.CANCELLED: 4}
    assert waits.cancelled == {"timeout": 4} and waits.waiting == 0


def test_a_request_sent_late_but_within_the_request_timeout_is_served(start_server):
    """The control of the cancel above: a Status whose request comes 0.7 s late (past ``OUTWAITED_S``, under
    the 1.5 s timeout) is answered; one whose request never comes is cancelled at 1.5 s."""
    server = start_server(timeouts=fast_timeouts(request=1.5))
    send, done = threading.Event(), threading.Event()

    def late():
        send.wait(10)
        yield pb.StatusRequest()

    def never():
        done.wait(10)
        return
        yield

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        status = channel.stream_unary("/paramhub.v1.ParameterServer/Status",
                                      request_serializer=pb.StatusRequest.SerializeToString,
                                      response_deserializer=pb.StatusResponse.FromString)
        start = time.monotonic()
        silent = status.future(never(), timeout=10)
        answered = status.future(late(), timeout=10)
        wait_for(lambda: server.request_waits.waiting == 2, what="both calls waiting")
        wait_for(lambda: time.monotonic() - start > 0.7, what="0.7 s")
        send.set()
        assert answered.result().server_epoch == server.servicer.epoch
        with pytest.raises(grpc.RpcError) as err:
            silent.result()
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert 1.5 <= time.monotonic() - start < 3.5
        done.set()
    assert server.request_waits.cancelled == {"timeout": 1}


@pytest.mark.parametrize("protected", [True, False], ids=["with-gate", "without-gate"])
def test_malformed_and_missing_requests_get_grpcs_own_codes(start_server, monkeypatch, protected):
    """The gate answers as grpc does: INTERNAL for bytes that do not parse, UNIMPLEMENTED for no request."""
    if not protected:
        without_the_gate(monkeypatch)
    server = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        as_unary = channel.unary_unary("/paramhub.v1.ParameterServer/Status")
        as_stream = channel.stream_unary("/paramhub.v1.ParameterServer/Status")
        with pytest.raises(grpc.RpcError) as garbage:
            as_unary(b"\xff\xff\xff", timeout=5)
        with pytest.raises(grpc.RpcError) as missing:
            as_stream(iter(()), timeout=5)
        pull_missing = channel.stream_stream("/paramhub.v1.ParameterServer/Pull")(iter(()), timeout=5)
        assert pull_missing.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (garbage.value.code(), garbage.value.details()) == (grpc.StatusCode.INTERNAL,
                                                               "Exception deserializing request!")
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "requires exactly one request message" in missing.value.details()  # grpc's own names the method as b'..'
    assert server.request_waits.waiting == 0
