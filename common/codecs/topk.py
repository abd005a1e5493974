"""Top-k sparsification with error feedback: each push sends the ``ratio`` largest elements of each tensor.

Each tensor sends the k = max(1, ratio × numel) largest-magnitude elements of
(update + residual); what was not sent stays in the residual and is added to the
next update, so no part of the update is lost, only delayed (the error feedback
that makes top-k converge like dense SGD). Picking per tensor gives every layer
its share, and the same picks however partitions split the model.

Chunk format: ``TensorChunk{region, indices, data}``, ``indices`` little-endian
uint32 element indices, strictly increasing across the push's chunks of a
region, ``data`` one value per index in the run's wire dtype; the header sets
``sparse`` and declares the pairs in ``sparse_values``. Elements not sent count
as zero.
"""

from __future__ import annotations

import torch

from paramhub.common import codec as wire
from paramhub.common.codec import Chunk, MalformedMessage, Piece
from paramhub.common.codecs.base import (SPARSE_INDEX_BYTES, ErrorFeedback, RegionContext, RegionEncoding,
                                         RegionReceiver, SparseIndices)
from paramhub.common.layout import dtype_size


def ratio(text: str) -> float:
    """A density in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


def top_k(acc: torch.Tensor, tensors: tuple[tuple[int, int], ...], density: float) -> torch.Tensor:
    """Sorted indices into ``acc`` of the max(1, density × numel) largest magnitudes of each tensor (offset, numel)."""
    picks = []
    for offset, numel in tensors:
        if numel:
            k = max(1, int(density * numel))
            local = torch.topk(acc[offset : offset + numel].abs(), k, sorted=False).indices
            picks.append(local.sort().values + offset)
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.int64)


class TopK(ErrorFeedback):
    """Top-k of (update + residual) per tensor, values in the wire dtype; the residual keeps the rest."""

    name = "topk"
    sparse = True
    PARAMS = {"ratio": (ratio, 0.01)}

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: torch.Tensor) -> RegionEncoding:
        acc = state.add_(update)
        indices = top_k(acc, ctx.tensors, self.params["ratio"])
        values = acc[indices].to(ctx.wire_dtype)
        acc[indices] -= values.float()  # error feedback keeps even the rounding of the values sent
        return RegionEncoding(lambda: wire.encoded_sparse_chunks(ctx.index, indices, values, ctx.chunk_bytes),
                              pairs=len(indices),
                              payload_bytes=len(indices) * (SPARSE_INDEX_BYTES + dtype_size(ctx.wire_dtype)))

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:
        return _TopKReceiver(ctx, max_abs)


class _TopKReceiver(RegionReceiver):
    def __init__(self, ctx: RegionContext, max_abs: float):
        super().__init__(ctx, max_abs)
        self.dtype = ctx.wire_dtype
        self.indices = SparseIndices(ctx.spec)

    def add(self, chunk: Chunk) -> None:
        indices = self.indices.take(chunk)
        if len(chunk.data) != len(indices) * dtype_size(self.dtype):
            raise MalformedMessage(f"region {self.spec.name}: sparse chunk needs one {self.dtype} value per index")
        values = wire.view_values(chunk.data, self.dtype)
        wire.check_values(values, self.max_abs)
        self.pieces.append(Piece(self.region, values, indices=indices))
        self.pairs += len(indices)
