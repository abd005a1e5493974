"""Dense codecs: every element of a PARAM region, as fp32, bf16 or fp16.

Chunk format: ``TensorChunk{region, offset, data}``, ``data`` the raw
little-endian elements of the codec's dtype from element ``offset`` on; a
region's chunks come in order and cover it exactly once. fp32 is lossless;
bf16 and fp16 round to nearest even (fp16 overflows to infinity beyond 65504,
and such a push is refused).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from paramhub.common import codec as wire
from paramhub.common.codecs.base import DenseReceiver, RegionContext, RegionEncoding, RegionReceiver, UpdateCodec
from paramhub.common.layout import dtype_size


class DenseCodec(UpdateCodec):
    """Sends PARAM regions whole in ``dtype``."""

    dtype: ClassVar[torch.dtype] = torch.float32

    def new_state(self, ctx: RegionContext) -> object:
        # a reused conversion buffer: a fresh one per push made the kernel hand out and zero pages each time
        return torch.empty(ctx.spec.numel, dtype=self.dtype) if ctx.spec.dtype != self.dtype else None

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: object) -> RegionEncoding:
        values = state.copy_(update) if state is not None else update
        step = max(1, ctx.chunk_bytes // dtype_size(self.dtype))
        region = ctx.index

        def messages():
            data = wire.region_bytes(values)
            elem = dtype_size(self.dtype)
            for start in range(0, values.numel(), step):
                count = min(step, values.numel() - start)
                yield wire.encode_chunk(region, start, data[start * elem: (start + count) * elem])

        return RegionEncoding(messages, payload_bytes=values.numel() * dtype_size(self.dtype))

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:
        return DenseReceiver(ctx, max_abs, self.dtype)


class Float32(DenseCodec):
    """IEEE binary32: lossless."""

    name = "fp32"
    dtype = torch.float32
    lossless = True


class BFloat16(DenseCodec):
    """bfloat16: half the bytes, 8 significant bits."""

    name = "bf16"
    dtype = torch.bfloat16


class Float16(DenseCodec):
    """IEEE binary16: half the bytes, 11 significant bits, values up to 65504."""

    name = "fp16"
    dtype = torch.float16
