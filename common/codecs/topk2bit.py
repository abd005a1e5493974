"""Top-k with 2-bit values and error feedback (as SparseLoCo, arXiv 2508.15706): about 1/90 of fp32's bytes at 1%.

Each tensor sends the k = max(1, ratio × numel) largest magnitudes of
(update + residual), as top-k does, but each value in 2 bits: its sign, and
whether its magnitude is above the chunk's median. The two magnitude levels are
the means of the magnitudes below and above it (the levels that minimise the
squared error for that split). The residual keeps everything not sent and the
quantisation error of what was, so nothing is lost, only delayed.

Chunk format: ``TensorChunk{region, indices, data}``: n little-endian uint32
``indices`` (the sparse rules), ``data`` two little-endian float32 levels lo and
hi (finite, 0 <= lo <= hi <= --max-update-abs), then ceil(n / 4) bytes of 2-bit
codes, value j in bits 2(j mod 4) and 2(j mod 4)+1 of byte j div 4, unused bits
zero. Code bit 0: negative; bit 1: magnitude hi (else lo). The header sets
``sparse`` and declares the pairs in ``sparse_values``.
"""

from __future__ import annotations

import struct

import torch

from paramhub.common import codec as wire
from paramhub.common.codec import Chunk, MalformedMessage, Piece
from paramhub.common.codecs.base import (SPARSE_INDEX_BYTES, RegionContext, RegionEncoding, RegionReceiver,
                                         SparseIndices, UpdateCodec, check_scale, sparse_chunk)
from paramhub.common.codecs.topk import ratio, top_k

_LEVELS = struct.Struct("<ff")
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack_codes(codes: torch.Tensor) -> bytes:
    """2-bit ``codes`` (uint8 0..3), four to a byte, the first in the low bits."""
    padded = torch.zeros(-(-codes.numel() // 4) * 4, dtype=torch.uint8)
    padded[: codes.numel()] = codes
    return (padded.view(-1, 4) << _SHIFTS).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


def unpack_codes(data: memoryview, count: int) -> torch.Tensor:
    """The first ``count`` 2-bit codes of ``data``; MalformedMessage if the unused bits are not zero."""
    packed = wire.view_values(data, torch.uint8)
    codes = ((packed.view(-1, 1) >> _SHIFTS) & 3).view(-1)
    if bool(codes[count:].any()):
        raise MalformedMessage("2-bit codes: the unused bits of the last byte must be zero")
    return codes[:count]


def quantise(values: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(lo, hi, codes, dequantised values) of ``values`` split at their median magnitude."""
    magnitude = values.abs()
    high = magnitude > magnitude.median()
    lo = float(magnitude[~high].mean())
    hi = float(magnitude[high].mean()) if bool(high.any()) else lo
    lo, hi = (float(torch.tensor(x, dtype=torch.float32)) for x in (lo, hi))  # as sent
    negative = values < 0
    codes = negative.to(torch.uint8) | (high.to(torch.uint8) << 1)
    dequantised = torch.where(high, hi, lo).to(torch.float32)
    dequantised[negative] *= -1
    return lo, hi, codes, dequantised


class TopK2Bit(UpdateCodec):
    """Top-k per tensor with 2-bit values (sign, one of two magnitudes per chunk), error feedback."""

    name = "topk2bit"
    sparse = True
    error_feedback = True
    PARAMS = {"ratio": (ratio, 0.01)}

    def new_state(self, ctx: RegionContext) -> torch.Tensor:
        return torch.zeros(ctx.spec.numel, dtype=torch.float32)  # the residual

    def residual(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: torch.Tensor) -> RegionEncoding:
        acc = state.add_(update)
        indices = top_k(acc, ctx.tensors, self.params["ratio"])
        # n pairs cost 4n index bytes, n/4 code bytes and the two levels
        per_chunk = max(1, (ctx.chunk_bytes - _LEVELS.size) * 4 // (4 * SPARSE_INDEX_BYTES + 1))
        chunks = []
        for start in range(0, len(indices), per_chunk):
            picked = indices[start : start + per_chunk]
            lo, hi, codes, sent = quantise(acc[picked])
            acc[picked] -= sent  # error feedback: the quantisation error stays behind
            chunks.append((picked, _LEVELS.pack(lo, hi) + pack_codes(codes)))

        def messages():
            for picked, data in chunks:
                yield sparse_chunk(ctx.index, picked, data)

        payload = sum(len(data) + SPARSE_INDEX_BYTES * len(picked) for picked, data in chunks)
        return RegionEncoding(messages, pairs=len(indices), payload_bytes=payload)

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:
        return _TopK2BitReceiver(ctx, max_abs)


class _TopK2BitReceiver(RegionReceiver):
    def __init__(self, ctx: RegionContext, max_abs: float):
        super().__init__(ctx, max_abs)
        self.indices = SparseIndices(ctx.spec)

    def add(self, chunk: Chunk) -> None:
        indices = self.indices.take(chunk)
        n = len(indices)
        if len(chunk.data) != _LEVELS.size + -(-n // 4):
            raise MalformedMessage(f"region {self.spec.name}: a 2-bit chunk of {n} indices needs "
                                   f"{_LEVELS.size + -(-n // 4)} data bytes, got {len(chunk.data)}")
        lo, hi = _LEVELS.unpack_from(chunk.data)
        check_scale(lo, 1, self.max_abs, self.spec)
        check_scale(hi, 1, self.max_abs, self.spec)
        if lo > hi:
            raise MalformedMessage(f"region {self.spec.name}: 2-bit levels lo {lo} above hi {hi}")
        codes = unpack_codes(chunk.data[_LEVELS.size :], n)
        values = torch.where((codes & 2).bool(), hi, lo).to(torch.float32)
        values[(codes & 1).bool()] *= -1
        self.pieces.append(Piece(self.region, values, indices=indices))
        self.pairs += n
