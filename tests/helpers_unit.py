"""Helpers shared by the pure unit tests (no sockets, no servers)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from hypothesis import HealthCheck, settings

from paramhub.common import codec
from paramhub.common.layout import Layout


def property_settings(max_examples: int) -> settings:
    """Hypothesis settings for unit tests: bounded, the same examples every run, no deadline, no database."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def random_regions(layout: Layout, seed: int = 0) -> list[torch.Tensor]:
    """Regions of ``layout`` filled with seeded values of every region's dtype."""
    gen = torch.Generator().manual_seed(seed)
    regions = []
    for spec in layout.regions:
        if spec.dtype.is_floating_point:
            regions.append(torch.randn(spec.numel, generator=gen).to(spec.dtype))
        else:
            regions.append(torch.randint(-(2**62), 2**62, (spec.numel,), generator=gen, dtype=spec.dtype))
    return regions


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), dtype and shape too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assemble(layout: Layout, messages: Iterable[bytes], region_ids: list[int] | None = None,
             decode: Callable[[bytes], object] = codec.decode_push_message) -> list[torch.Tensor]:
    """Decodes serialized chunk messages and assembles them into fresh regions (checks finish())."""
    ids = list(range(len(layout.regions))) if region_ids is None else list(region_ids)
    out = layout.empty_regions()
    assembler = codec.RegionAssembler(layout, out, ids)
    for raw in messages:
        chunk = decode(raw)
        assert isinstance(chunk, codec.Chunk), chunk
        assembler.add(chunk)
    assembler.finish()
    return out


def varint(value: int) -> bytes:
    """Protobuf base-128 varint, written independently of the code under test."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint((number << 3) | 2) + varint(len(payload)) + payload
