"""Top-k with 2-bit values and error feedback (as SparseLoCo, arXiv 2508.15706): 1/180 of fp32's bytes at 1%.

Each tensor sends the k = max(1, ratio × numel) largest magnitudes of
(update + residual), as top-k does, but each value in 2 bits: its sign, and
whether its magnitude is above the chunk's median. The two magnitude levels are
the means of the magnitudes below and above it (the levels that minimise the
squared error for that split). The residual keeps everything not sent and the
quantisation error of what was, so nothing is lost, only delayed. Indices travel
as varint gaps (about 1 byte each at 1%, where 32-bit indices were 4).

Chunk format: ``TensorChunk{region, data}`` (no ``indices``), ``data``:
little-endian uint32 n (>= 1), float32 levels lo and hi (finite,
0 <= lo <= hi <= --max-update-abs), n unsigned LEB128 varints of at most 5 bytes
(the first element's index, then the gaps to each next one, each >= 1: indices
strictly increase across the push's chunks of a region, and stay below its
numel), then ceil(n / 4) bytes of 2-bit codes, value j in bits 2(j mod 4) and
2(j mod 4)+1 of byte j div 4, unused bits zero. Code bit 0: negative; bit 1:
magnitude hi (else lo). Nothing may follow. The header sets ``sparse`` and
declares the pairs in ``sparse_values``.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from paramhub.common import codec as wire
from paramhub.common.codec import Chunk, MalformedMessage, Piece
from paramhub.common.codecs.base import ErrorFeedback, RegionContext, RegionEncoding, RegionReceiver, check_scale
from paramhub.common.codecs.topk import ratio, top_k

_HEAD = struct.Struct("<Iff")  # n, lo, hi
_MAX_VARINT = 5  # bytes of a uint32
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


def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each of ``values`` (uint32 at most), vectorised."""
    values = values.astype(np.uint64)
    lengths = 1 + sum((values >= 1 << (7 * k)).astype(np.int64) for k in range(1, _MAX_VARINT))
    position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = (np.repeat(values, lengths) >> (7 * position).astype(np.uint64)) & 0x7F
    out |= np.where(position < np.repeat(lengths - 1, lengths), 0x80, 0).astype(np.uint64)
    return out.astype(np.uint8).tobytes()


def decode_varints(data: memoryview, count: int) -> tuple[np.ndarray, int]:
    """The first ``count`` LEB128 varints of ``data`` (int64) and the bytes they took; MalformedMessage if bad."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)[:count]
    if len(ends) < count:
        raise MalformedMessage(f"2-bit chunk: {len(ends)} whole varint indices of the {count} declared")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT:
        raise MalformedMessage("2-bit chunk: a varint index longer than 5 bytes")
    used = int(ends[-1]) + 1
    position = np.arange(used) - np.repeat(starts, lengths)
    parts = (raw[:used].astype(np.uint64) & 0x7F) << (7 * position).astype(np.uint64)
    values = np.add.reduceat(parts, starts)
    if int(values.max()) >> 32:
        raise MalformedMessage("2-bit chunk: a varint index beyond 32 bits")
    return values.astype(np.int64), used


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


class TopK2Bit(ErrorFeedback):
    """Top-k per tensor with 2-bit values (sign, one of two magnitudes per chunk), error feedback."""

    name = "topk2bit"
    sparse = True
    PARAMS = {"ratio": (ratio, 0.01)}

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: torch.Tensor) -> RegionEncoding:
        acc = state.add_(update)
        indices = top_k(acc, ctx.tensors, self.params["ratio"])
        # worst case per pair: a 5-byte gap and a quarter byte of code
        per_chunk = max(1, (ctx.chunk_bytes - _HEAD.size) * 4 // (4 * _MAX_VARINT + 1))
        chunks = []
        for start in range(0, len(indices), per_chunk):
            picked = indices[start : start + per_chunk]
            lo, hi, codes, sent = quantise(acc[picked])
            acc[picked] -= sent  # error feedback: the quantisation error stays behind
            gaps = np.diff(picked.numpy(), prepend=0)  # the first index, then the gaps
            chunks.append(_HEAD.pack(len(picked), lo, hi) + encode_varints(gaps) + pack_codes(codes))

        def messages():
            for data in chunks:
                yield wire.encode_chunk(ctx.index, 0, data)

        return RegionEncoding(messages, pairs=len(indices), payload_bytes=sum(map(len, chunks)))

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:
        return _TopK2BitReceiver(ctx, max_abs)


class _TopK2BitReceiver(RegionReceiver):
    def __init__(self, ctx: RegionContext, max_abs: float):
        super().__init__(ctx, max_abs)
        self.last = -1  # the last index received: indices strictly increase across the region's chunks

    def add(self, chunk: Chunk) -> None:
        name, data = self.spec.name, chunk.data
        if chunk.indices is not None or chunk.offset:
            raise MalformedMessage(f"region {name}: a 2-bit chunk carries everything in data (no indices, offset 0)")
        if len(data) < _HEAD.size + 2:
            raise MalformedMessage(f"region {name}: a 2-bit chunk of {len(data)} bytes is too short")
        n, lo, hi = _HEAD.unpack_from(data)
        if not 1 <= n <= self.spec.numel:
            raise MalformedMessage(f"region {name}: a 2-bit chunk of {n} values (the region has {self.spec.numel})")
        check_scale(lo, 1, self.max_abs, self.spec)
        check_scale(hi, 1, self.max_abs, self.spec)
        if lo > hi:
            raise MalformedMessage(f"region {name}: 2-bit levels lo {lo} above hi {hi}")
        gaps, used = decode_varints(data[_HEAD.size :], n)
        if bool((gaps[1:] < 1).any()):
            raise MalformedMessage(f"region {name}: 2-bit indices must be strictly increasing")
        indices = np.cumsum(gaps)
        if int(indices[0]) <= self.last or int(indices[-1]) >= self.spec.numel:
            raise MalformedMessage(f"region {name}: 2-bit indices {int(indices[0])}..{int(indices[-1])} out of "
                                   f"order or beyond {self.spec.numel}")
        codes_at = _HEAD.size + used
        if len(data) - codes_at != -(-n // 4):
            raise MalformedMessage(f"region {name}: {n} values need {-(-n // 4)} code bytes after the indices, "
                                   f"got {len(data) - codes_at}")
        codes = unpack_codes(data[codes_at:], n)
        values = torch.where((codes & 2).bool(), hi, lo).to(torch.float32)
        values[(codes & 1).bool()] *= -1
        self.pieces.append(Piece(self.region, values, indices=torch.from_numpy(indices)))
        self.pairs += n
        self.last = int(indices[-1])
