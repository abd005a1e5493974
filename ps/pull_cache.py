"""A version's pull stream, encoded once and shared by the workers that pull it together.

In a sync round every worker pulls the same new version at the same moment.
Encoding a chunk message copies its payload out of the weights (converting to
bf16/fp16 on the way when the wire is narrower), so N pulls made N copies of the
model per round, all identical. The cache encodes each chunk on first demand, so
the first puller streams at once, and the others send the same bytes objects.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from paramhub.common import codec
from paramhub.common.layout import Layout


class EncodedVersion:
    """The chunk messages of one version of ``regions`` in ``wire_layout``'s dtypes.

    The regions must stay unchanged while any chunk is still to be encoded: use it
    only inside ``ParameterStore.reading`` of ``version`` (every Pull does).
    """

    def __init__(self, version: int, wire_layout: Layout, regions: list[torch.Tensor], region_ids: list[int],
                 chunk_bytes: int):
        self.version = version
        # (region, element offset, the slice of the weights it carries), until encoded
        self._pieces: list[tuple[int, int, torch.Tensor] | None] = [
            (r, start, regions[r][start : start + count])
            for r, start, count in codec.chunk_spans(wire_layout, region_ids, chunk_bytes)]
        self._dtypes = [spec.dtype for spec in wire_layout.regions]
        self._encoded: list[bytes | None] = [None] * len(self._pieces)
        self._lock = threading.Lock()
        self.streams = 0  # pulls streaming it (kept by PullCache)

    def messages(self) -> Iterator[bytes]:
        """The serialized chunk messages in order, encoding any not encoded yet."""
        for i in range(len(self._encoded)):
            yield self._encoded[i] or self._encode(i)

    def _encode(self, i: int) -> bytes:
        with self._lock:  # two pullers racing for the same chunk encode it once
            if self._encoded[i] is None:
                r, offset, source = self._pieces[i]
                payload = source if source.dtype == self._dtypes[r] else source.to(self._dtypes[r])
                self._encoded[i] = codec.encode_chunk(r, offset, codec.region_bytes(payload))
                self._pieces[i] = None  # the bytes no longer depend on the weights' memory
            return self._encoded[i]


class PullCache:
    """Shares the encoded stream of the version being pulled between its concurrent pulls.

    The encoding lives while some pull streams it: in a sync round all workers wait
    for the new version and stream it together, then it is dropped, so during the
    push phase that follows it does not hold a copy of the model.
    """

    def __init__(self, wire_layout: Layout, region_ids: list[int], chunk_bytes: int):
        self._wire_layout = wire_layout
        self._region_ids = region_ids
        self._chunk_bytes = chunk_bytes
        self._current: EncodedVersion | None = None
        self._lock = threading.Lock()

    def stream(self, version: int, regions: list[torch.Tensor]) -> Iterator[bytes]:
        """The chunk messages of ``version`` (whose weights are ``regions``), shared with concurrent pulls of it."""
        with self._lock:
            encoded = self._current
            if encoded is None or encoded.version != version:
                encoded = EncodedVersion(version, self._wire_layout, regions, self._region_ids, self._chunk_bytes)
                if self._current is None or version > self._current.version or not self._current.streams:
                    self._current = encoded  # a late pull of an older version keeps its encoding to itself
            encoded.streams += 1
        try:
            yield from encoded.messages()
        finally:
            with self._lock:
                encoded.streams -= 1
                if not encoded.streams and self._current is encoded:
                    self._current = None
