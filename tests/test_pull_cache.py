"""ps/pull_cache.py: concurrent pulls of a version share one encoding, byte-identical to encoding the
converted weights, and nothing is kept once no pull streams it."""

from __future__ import annotations

import threading

import pytest
import torch

from paramhub.common import codec
from paramhub.common.layout import BUFFER, PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.pull_cache import PullCache

pytestmark = pytest.mark.timeout(60)

LAYOUT = Layout.from_entries([
    ("w", torch.float32, (1000,), PARAM),
    ("bn", torch.float32, (10,), BUFFER),
    ("steps", torch.int64, (3,), BUFFER),
])
ALL = [0, 1, 2]


def weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1000, generator=gen), torch.randn(10, generator=gen), torch.arange(3)]


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16, torch.float16])
def test_messages_equal_encoding_the_converted_weights(wire):
    wire_layout = LAYOUT.on_wire(wire)
    regions = weights()
    converted = [r.to(spec.dtype) for r, spec in zip(regions, wire_layout.regions)]
    expected = list(codec.encoded_chunks(wire_layout, converted, chunk_bytes=256))
    got = list(PullCache(wire_layout, ALL, chunk_bytes=256).stream(1, regions))
    assert got == expected
    decoded = [pb.PullMessage.FromString(m).chunk for m in got]  # stock protobuf reads them
    assert sum(len(c.data) for c in decoded) == wire_layout.nbytes


def test_concurrent_pulls_share_one_encoding_which_is_dropped_after_them():
    cache = PullCache(LAYOUT.on_wire(torch.bfloat16), ALL, chunk_bytes=128)
    regions = weights()
    first = cache.stream(3, regions)
    head = next(first)  # a pull in the middle of streaming version 3
    second = list(cache.stream(3, regions))
    rest = list(first)
    assert second[0] is head and all(a is b for a, b in zip(second[1:], rest))
    again = list(cache.stream(3, regions))  # nobody streams version 3 any more: encoded afresh
    assert again == second and again[0] is not head


def test_a_late_pull_of_an_older_version_neither_evicts_nor_shares_the_newer_one():
    cache = PullCache(LAYOUT, ALL, chunk_bytes=512)
    newer = cache.stream(2, weights(2))
    head = next(newer)
    old = list(cache.stream(1, weights(1)))  # a pull that started reading version 1 before version 2 existed
    assert old[0] != head
    assert next(cache.stream(2, weights(2))) is head  # version 2 is still shared
    newer.close()


def test_racing_pullers_encode_each_chunk_once():
    cache = PullCache(LAYOUT, ALL, chunk_bytes=64)
    regions = weights()
    all_started = threading.Barrier(4, timeout=30)
    results: list[list[bytes]] = []

    def pull():
        stream = cache.stream(1, regions)
        head = next(stream)
        all_started.wait()  # every pull is streaming before any finishes
        results.append([head, *stream])

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    for other in results[1:]:
        assert len(other) == len(results[0]) and all(a is b for a, b in zip(results[0], other))
