"""Stream limits (ps/limits.py) and their flags, without a socket.

The server-side behaviour under load (silent streams, health checks, a client
backing off) is in test_reachability.py.
"""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from paramhub.common.config import RESERVED_THREADS, ServerConfig, Timeouts
from paramhub.ps.cli import main as server_main
from paramhub.ps.errors import Busy
from paramhub.ps.limits import StreamLimits, peer_host

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("peer, host", [
    ("ipv4:127.0.0.1:41234", "127.0.0.1"),
    ("ipv4:10.0.0.5:50051", "10.0.0.5"),
    ("ipv6:%5B::1%5D:60618", "::1"),  # what grpcio 1.85 reports
    ("ipv6:[fe80::1%25eth0]:5", "fe80::1%eth0"),
    ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
    ("unix:/tmp/ps.sock", "unix:/tmp/ps.sock"),
])
def test_peer_host_drops_the_port_so_a_hosts_connections_count_together(peer, host):
    assert peer_host(peer) == host


def test_the_per_peer_limit_refuses_that_peer_only_and_names_its_flag():
    limits = StreamLimits(total=10, per_peer=2)
    held = [limits.acquire("a"), limits.acquire("a")]
    with pytest.raises(Busy) as err:
        limits.acquire("a")
    assert err.value.limit == "per_peer" and "--max-streams-per-peer" in str(err.value)
    assert err.value.code.name == "RESOURCE_EXHAUSTED" and err.value.retry_after_s > 0
    held.append(limits.acquire("b"))  # another host is not refused
    assert (limits.open, limits.open_by_peer(), limits.refused["per_peer"]) == (3, {"a": 2, "b": 1}, 1)
    held[0].release()
    held.append(limits.acquire("a"))  # a released slot is free again
    assert limits.open_by_peer() == {"a": 2, "b": 1}


def test_the_total_limit_refuses_every_peer_and_names_its_flag():
    limits = StreamLimits(total=3, per_peer=3)
    held = [limits.acquire("a"), limits.acquire("b"), limits.acquire("c")]
    for peer in ("a", "d"):
        with pytest.raises(Busy) as err:
            limits.acquire(peer)
        assert err.value.limit == "total" and "--max-open-streams" in str(err.value)
    assert limits.refused == {"total": 2}
    for lease in held:
        lease.release()
    assert (limits.open, limits.open_by_peer()) == (0, {})


def test_a_lease_released_twice_frees_one_slot():
    """The servicer releases on the RPC's end callback; a second release must not free someone else's slot."""
    limits = StreamLimits(total=2, per_peer=2)
    first = limits.acquire("a")
    limits.acquire("a")
    first.release()
    first.release()
    assert limits.open == 1
    limits.acquire("a")
    with pytest.raises(Busy):
        limits.acquire("a")


def test_concurrent_acquires_never_exceed_the_limits_and_all_come_back():
    limits = StreamLimits(total=5, per_peer=3)
    held_most, lock, start = [0], threading.Lock(), threading.Barrier(8)
    granted = []

    def worker(peer: str):
        start.wait()
        for _ in range(300):
            try:
                lease = limits.acquire(peer)
            except Busy:
                continue
            with lock:
                granted.append(peer)
                held_most[0] = max(held_most[0], limits.open)
                assert limits.open_by_peer().get(peer, 0) <= 3
            lease.release()

    threads = [threading.Thread(target=worker, args=("abcd"[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert 1 <= held_most[0] <= 5 and len(granted) > 0
    assert (limits.open, limits.open_by_peer()) == (0, {})


# -- the flags --------------------------------------------------------------------------------------


def test_by_default_streams_leave_the_reserved_threads_and_a_host_gets_64():
    config = ServerConfig()
    assert (config.rpc_threads, config.stream_limit, config.max_streams_per_peer) == (128, 128 - RESERVED_THREADS, 64)
    assert ServerConfig(rpc_threads=40).stream_limit == 40 - RESERVED_THREADS  # follows --rpc-threads
    assert ServerConfig(rpc_threads=40, max_open_streams=10).stream_limit == 10


@pytest.mark.parametrize("fields, words", [
    (dict(rpc_threads=RESERVED_THREADS), "--rpc-threads must be more than"),
    (dict(rpc_threads=32, max_open_streams=32 - RESERVED_THREADS + 1), "--max-open-streams must be from 1 to"),
    (dict(max_open_streams=0), "--max-open-streams must be from 1 to"),
    (dict(max_streams_per_peer=0), "--max-streams-per-peer must be at least 1"),
    (dict(timeouts=Timeouts(stall=0)), "--stall-timeout must be positive"),
])
def test_limits_that_would_take_the_reserved_threads_are_refused(fields, words):
    with pytest.raises(ValueError, match=words):
        ServerConfig(**fields)


def test_ps_server_refuses_a_stream_limit_above_its_threads_before_starting():
    result = CliRunner().invoke(server_main, ["--model", "mlp", "--port", "0", "--rpc-threads", "16",
                                              "--max-open-streams", "9"])
    assert result.exit_code == 2 and "--max-open-streams must be from 1 to --rpc-threads - 8 (8)" in result.output
    result = CliRunner().invoke(server_main, ["--model", "mlp", "--port", "0", "--stall-timeout", "0"])
    assert result.exit_code == 2 and "must be positive" in result.output
