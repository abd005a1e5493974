"""int8 with a per-chunk scale and error feedback: a quarter of fp32's bytes.

Each chunk quantises its elements of (update + residual) to q = round(v / s),
q in [-127, 127], with s = max|v| / 127 over the chunk; the residual keeps
v - q·s for the next push, so rounding is delayed, never lost.

Chunk format: ``TensorChunk{region, offset, data}``, ``data`` a little-endian
float32 scale s (finite, >= 0, 127·s at most --max-update-abs) followed by one
int8 q per element from ``offset`` on (-128 is refused); the element is q·s. A
region's chunks follow the dense chunk rules, counting elements.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from paramhub.common import codec as wire
from paramhub.common.codec import Chunk, MalformedMessage, Piece
from paramhub.common.codecs.base import (DenseCoverage, ErrorFeedback, RegionContext, RegionEncoding, RegionReceiver,
                                         check_scale)

LEVELS = 127
_SCALE = struct.Struct("<f")


class Int8(ErrorFeedback):
    """Dense int8 values, one float32 scale per chunk, error feedback."""

    name = "int8"

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: torch.Tensor) -> RegionEncoding:
        acc = state.add_(update)
        step = max(1, ctx.chunk_bytes - _SCALE.size)
        quantised = torch.empty(acc.numel(), dtype=torch.int8)
        chunks = []
        for start in range(0, acc.numel(), step):
            part = acc[start : start + step]
            # the scale as float32, the same number the server multiplies by
            scale = float(torch.tensor(float(part.abs().max()) / LEVELS, dtype=torch.float32))
            q = quantised[start : start + part.numel()]
            if scale > 0:
                q.copy_(torch.round(part / scale).clamp_(-LEVELS, LEVELS))
                part.sub_(q.float().mul_(scale))  # error feedback: what rounding left out
            else:
                q.zero_()
            chunks.append((start, scale, q))

        def messages():
            for start, scale, q in chunks:
                yield wire.encode_chunk(ctx.index, start, _SCALE.pack(scale) + q.numpy().tobytes())

        return RegionEncoding(messages, payload_bytes=acc.numel() + _SCALE.size * len(chunks))

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:
        return _Int8Receiver(ctx, max_abs)


class _Int8Receiver(RegionReceiver):
    ordered = True

    def __init__(self, ctx: RegionContext, max_abs: float):
        super().__init__(ctx, max_abs)
        self.coverage = DenseCoverage(ctx.spec)

    def add(self, chunk: Chunk) -> None:
        if len(chunk.data) <= _SCALE.size:
            raise MalformedMessage(f"region {self.spec.name}: an int8 chunk needs a float32 scale and values")
        (scale,) = _SCALE.unpack_from(chunk.data)
        check_scale(scale, LEVELS, self.max_abs, self.spec)
        levels = chunk.data[_SCALE.size :]
        if int(np.frombuffer(levels, dtype=np.int8).min()) < -LEVELS:  # numpy's int8 min: 200x torch's here
            raise MalformedMessage(f"region {self.spec.name}: int8 level -128 is not used (levels are -127..127)")
        offset = self.coverage.place(chunk, len(levels))
        values = wire.view_values(levels, torch.int8).to(torch.float32).mul_(scale)
        self.pieces.append(Piece(self.region, values, offset))

    def finish(self) -> None:
        self.coverage.finish()
