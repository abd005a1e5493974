"""The update codec seam: how a push's PARAM regions travel, worker to server.

A codec has two halves that never meet in one process:

- the worker's **encoder** (``UpdateCodec.encode``) turns one PARAM region of an
  update into chunk messages, keeping whatever it did not send (a residual) in
  the per-region state it asked for, so the next push carries it (error feedback);
- the server's **receiver** (``UpdateCodec.receiver``) validates each chunk of
  one region as it arrives and turns it into ``Piece``s the engine accumulates.

Everything around them is shared and codec-blind: ``PushEncoder`` (all regions of
a push: PARAM regions through the codec, BUFFER regions dense in the wire dtype,
the header fields the codec implies) and ``PushReceiver`` (routing each chunk to
its region's receiver, checking the whole push is there). Clients, partitions,
the servicer and the trainer only ever see those two. Pulls always travel dense
in the run's wire dtype (``RunSpec.wire_dtype``): a codec changes pushes only.

A push header names its codec (``PushHeader.codec``) but not the codec's
parameters, so a receiver must not depend on them: what it needs to decode
(scales, counts) travels in the chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Iterator

import torch

from paramhub.common import codec as wire
from paramhub.common.codec import Chunk, MalformedMessage, Piece
from paramhub.common.layout import PARAM, Layout, Region, dtype_size

SPARSE_INDEX_BYTES = 4  # sparse chunks carry little-endian uint32 element indices


class CodecError(ValueError):
    """A codec name or parameter that cannot be used (unknown name, bad value)."""


# -- the interface a codec implements -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegionContext:
    """What a codec knows of the PARAM region it encodes or receives.

    ``spec`` is in the model's dtype; ``tensors`` are the (offset, numel) of the
    region's tensors in order (they tile it), for codecs that work per tensor,
    which makes them blind to how partitions split the model.
    """

    index: int
    spec: Region
    tensors: tuple[tuple[int, int], ...]
    wire_dtype: torch.dtype
    chunk_bytes: int


def region_contexts(layout: Layout, wire_dtype: torch.dtype, chunk_bytes: int) -> dict[int, RegionContext]:
    """The context of each PARAM region of ``layout``."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for t in layout.tensors:
        spans.setdefault(t.region, []).append((t.offset, t.numel))
    return {r: RegionContext(r, layout.regions[r], tuple(spans.get(r, ())), wire_dtype, chunk_bytes)
            for r in layout.region_indices(PARAM)}


class RegionReceiver:
    """Validates the chunks of one PARAM region of one push; keeps them as ``pieces``.

    ``add`` raises ``MalformedMessage`` for anything outside the codec's format
    (sizes, offsets, indices, non-finite values, values above ``max_abs``);
    ``finish`` raises it unless the region is complete. Sparse receivers count
    the (index, value) pairs they took in ``pairs``. ``expected_bytes`` is the
    payload a whole region carries, where the format fixes it (for logs).
    """

    expected_bytes: int | None = None
    ordered = False  # dense: its chunks take their place in the push's ascending order of dense regions

    def __init__(self, ctx: RegionContext, max_abs: float):
        self.ctx = ctx
        self.region = ctx.index
        self.spec = ctx.spec
        self.max_abs = max_abs
        self.pieces: list[Piece] = []
        self.pairs = 0

    def add(self, chunk: Chunk) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> None:
        """Raises MalformedMessage unless everything this region needs arrived (default: nothing required)."""


class UpdateCodec:
    """One way of encoding a push's PARAM regions. Subclasses set ``name`` and implement the four hooks.

    Args (as keyword strings, from ``--codec NAME:key=value,...``): whatever the
    subclass's ``PARAMS`` lists; unknown keys are refused.

    Class attributes:
        name: the registry name, also sent as ``PushHeader.codec``.
        sparse: chunks carry indices; the header declares ``sparse_values``.
        error_feedback: the encoder keeps what it did not send and sends it later.
        lossless: decoding gives back exactly what was encoded.
        PARAMS: parameter name -> (parser, default).
    """

    name: ClassVar[str] = ""
    sparse: ClassVar[bool] = False
    error_feedback: ClassVar[bool] = False
    lossless: ClassVar[bool] = False
    PARAMS: ClassVar[dict[str, tuple[Callable[[str], object], object]]] = {}

    def __init__(self, **params: str):
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(self.PARAMS) or "none"
            raise CodecError(f"codec {self.name} has no parameter {', '.join(unknown)} (it takes: {known})")
        self.params = {}
        for key, (parse, default) in self.PARAMS.items():
            try:
                self.params[key] = parse(params[key]) if key in params else default
            except (TypeError, ValueError) as exc:
                raise CodecError(f"codec {self.name}: bad {key}={params[key]!r}: {exc}") from None

    @property
    def spec(self) -> str:
        """The canonical ``NAME[:key=value,...]`` string (every parameter spelt out), as RunSpec.codec carries it."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"

    # -- worker side ----------------------------------------------------------------------------------------

    def new_state(self, ctx: RegionContext) -> object:
        """Per-region encoder state for a PARAM region (a residual, a reused buffer); None if none."""
        return None

    def encode(self, ctx: RegionContext, update: torch.Tensor, state: object) -> "RegionEncoding":  # pragma: no cover
        """Encodes one PARAM region of an update (a flat CPU tensor, not modified), updating ``state``.

        Called once per push (a retried push resends the same encoding), so
        error feedback is committed here.
        """
        raise NotImplementedError

    def residual(self, state: object) -> torch.Tensor | None:
        """The part of past updates not sent yet (error-feedback codecs), for tests and metrics."""
        return None

    # -- server side ----------------------------------------------------------------------------------------

    def receiver(self, ctx: RegionContext, max_abs: float) -> RegionReceiver:  # pragma: no cover - interface
        """A receiver for one PARAM region of one push (``ctx.chunk_bytes``: the most a chunk may carry)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class RegionEncoding:
    """One region's encoded part of a push: ``messages()`` may be called again for a retry."""

    messages: Callable[[], Iterator[bytes]]
    pairs: int = 0  # sparse codecs: (index, value) pairs sent
    payload_bytes: int = 0


# -- helpers codecs share -----------------------------------------------------------------------------------


class DenseCoverage:
    """Checks that dense chunks of one region arrive in order, without gaps or overlaps, covering it once."""

    def __init__(self, spec: Region):
        self.spec = spec
        self.filled = 0  # elements so far

    @property
    def complete(self) -> bool:
        return self.filled == self.spec.numel

    def place(self, chunk: Chunk, count: int) -> int:
        """Accounts for ``count`` elements at ``chunk.offset``; returns that offset."""
        if chunk.indices is not None:
            raise MalformedMessage(f"region {self.spec.name}: a dense chunk carries no indices")
        if chunk.offset != self.filled:
            raise MalformedMessage(f"region {self.spec.name}: chunk at element {chunk.offset}, expected {self.filled}")
        if count <= 0:
            raise MalformedMessage(f"region {self.spec.name}: empty chunk")
        if self.filled + count > self.spec.numel:
            raise MalformedMessage(f"region {self.spec.name}: chunk runs past the region's {self.spec.numel} elements")
        self.filled += count
        return chunk.offset

    def finish(self) -> None:
        """Raises MalformedMessage unless the region is complete."""
        if self.filled != self.spec.numel:
            raise MalformedMessage(
                f"stream ended with region {self.spec.name} at {self.filled} of {self.spec.numel} elements")


class DenseReceiver(RegionReceiver):
    """A region sent whole as raw ``dtype`` elements: a dense codec's PARAM region, or any BUFFER region."""

    ordered = True

    def __init__(self, ctx: RegionContext, max_abs: float, dtype: torch.dtype):
        super().__init__(ctx, max_abs)
        self.dtype = dtype
        self.elem = dtype_size(dtype)
        self.expected_bytes = ctx.spec.numel * self.elem
        self.coverage = DenseCoverage(ctx.spec)

    def add(self, chunk: Chunk) -> None:
        n = len(chunk.data)
        if n % self.elem:
            raise MalformedMessage(f"region {self.spec.name}: chunk of {n} bytes is not a whole number of {self.dtype}")
        offset = self.coverage.place(chunk, n // self.elem)
        values = wire.view_values(chunk.data, self.dtype)
        wire.check_values(values, self.max_abs)  # while the bytes are still in the cache
        self.pieces.append(Piece(self.region, values, offset))

    def finish(self) -> None:
        self.coverage.finish()


class ErrorFeedback(UpdateCodec):
    """A lossy codec whose per-region state is an fp32 residual: what it has not sent yet, added to the next update."""

    error_feedback = True

    def new_state(self, ctx: RegionContext) -> torch.Tensor:
        return torch.zeros(ctx.spec.numel, dtype=torch.float32)

    def residual(self, state: torch.Tensor) -> torch.Tensor:
        return state


class SparseIndices:
    """Checks the uint32 indices of sparse chunks: strictly increasing across the push, inside the region."""

    def __init__(self, spec: Region):
        self.spec = spec
        self.last = -1

    def take(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's indices as int64; raises MalformedMessage unless they are in order and in range."""
        if chunk.indices is None or not len(chunk.indices) or len(chunk.indices) % SPARSE_INDEX_BYTES:
            raise MalformedMessage(f"region {self.spec.name}: a sparse chunk needs uint32 indices")
        indices = wire.view_values(chunk.indices, torch.int32).to(torch.int64) & 0xFFFFFFFF
        if int(indices[0]) <= self.last or (len(indices) > 1 and not bool((indices.diff() > 0).all())):
            raise MalformedMessage(f"region {self.spec.name}: sparse indices must be strictly increasing")
        if int(indices[-1]) >= self.spec.numel:
            raise MalformedMessage(f"region {self.spec.name}: sparse index {int(indices[-1])} beyond {self.spec.numel}")
        self.last = int(indices[-1])
        return indices


def sparse_chunk(region: int, indices: torch.Tensor, data: bytes) -> bytes:
    """A serialized sparse chunk message: uint32 ``indices`` and the codec's ``data``."""
    return wire.encode_sparse_chunk(region, indices.to(torch.int32).numpy().tobytes(), data)


def check_scale(scale: float, levels: float, max_abs: float, spec: Region) -> None:
    """Raises MalformedMessage unless a quantisation scale is finite, not negative, and ``scale × levels ≤ max_abs``."""
    if not (math.isfinite(scale) and scale >= 0):
        raise MalformedMessage(f"region {spec.name}: chunk scale {scale} is not a finite number >= 0")
    if scale * levels > max_abs:
        raise MalformedMessage(f"region {spec.name}: chunk values reach {scale * levels:.3g}, above the server's "
                               f"bound of {max_abs:.3g} (--max-update-abs); nothing was applied")


# -- the codec-blind parts around codecs ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedPush:
    """A whole push's chunks (``messages()`` again for a retry) and the header fields they imply."""

    messages: Callable[[], Iterator[bytes]]
    codec: str
    sparse: bool
    sparse_values: int
    payload_bytes: int


class PushEncoder:
    """Encodes whole updates for one server: PARAM regions through ``codec``, the rest dense in ``wire_dtype``.

    Keeps the codec's per-region state (error-feedback residuals) from push to push.

    Args:
        codec: the run's codec.
        layout: the layout of the regions pushed (the model's dtypes).
        wire_dtype: the run's wire dtype (BUFFER regions travel in it).
        chunk_bytes: payload bytes per chunk at most.
    """

    def __init__(self, codec: UpdateCodec, layout: Layout, wire_dtype: torch.dtype, chunk_bytes: int):
        self.codec = codec
        self.layout = layout
        self.wire_dtype = wire_dtype
        self.chunk_bytes = chunk_bytes
        self._wire_layout = layout.on_wire(wire_dtype)
        self._params = layout.region_indices(PARAM)
        self._others = [r for r in range(len(layout.regions)) if r not in self._params]
        self._contexts = region_contexts(layout, wire_dtype, chunk_bytes)
        self._states = {r: codec.new_state(ctx) for r, ctx in self._contexts.items()}
        self._buffers = {r: torch.empty(layout.regions[r].numel, dtype=self._wire_layout.regions[r].dtype)
                         for r in self._others if self._wire_layout.regions[r].dtype != layout.regions[r].dtype}

    def residual(self, region: int) -> torch.Tensor | None:
        """What the codec has not sent yet of ``region`` (None without error feedback)."""
        return self.codec.residual(self._states[region])

    def encode(self, regions: list[torch.Tensor]) -> EncodedPush:
        """Encodes one push of ``regions`` (every region of the layout); the codec's state moves on."""
        self.layout.check_regions(regions)
        parts = [self.codec.encode(self._contexts[r], regions[r], self._states[r]) for r in self._params]
        others = [self._buffers[r].copy_(regions[r]) if r in self._buffers else regions[r] for r in self._others]
        wire_layout, ids, chunk_bytes = self._wire_layout, self._others, self.chunk_bytes
        others_by_id = dict(zip(ids, others))
        dense_regions = [others_by_id.get(r) for r in range(len(regions))]

        def messages() -> Iterator[bytes]:
            for part in parts:
                yield from part.messages()
            yield from wire.encoded_chunks(wire_layout, dense_regions, ids, chunk_bytes)

        other_bytes = sum(wire_layout.regions[r].nbytes for r in ids)
        return EncodedPush(messages, self.codec.name, self.codec.sparse, sum(p.pairs for p in parts),
                           sum(p.payload_bytes for p in parts) + other_bytes)


class PushReceiver:
    """Receives one push: each chunk to its region's receiver, then checks the push is whole.

    Args:
        codec: the codec the header names (its receivers take the PARAM regions),
            or None for a push with every region dense in the wire dtype.
        layout: the server's layout (the model's dtypes).
        wire_dtype: the run's wire dtype.
        max_abs: the largest value magnitude accepted.
    """

    def __init__(self, codec: UpdateCodec | None, layout: Layout, wire_dtype: torch.dtype, max_abs: float = math.inf,
                 chunk_bytes: int = wire.MAX_CHUNK_BYTES):
        self.codec = codec
        contexts = region_contexts(layout, wire_dtype, chunk_bytes) if codec is not None else {}
        self._regions: list[RegionReceiver] = [
            codec.receiver(contexts[r], max_abs) if r in contexts
            else DenseReceiver(RegionContext(r, spec, (), wire_dtype, chunk_bytes), max_abs,
                               wire_dtype if spec.dtype.is_floating_point else spec.dtype)
            for r, spec in enumerate(layout.regions)]
        self.received_bytes = 0
        self._filling = -1  # the dense region being filled: dense regions come in ascending order

    def add(self, chunk: Chunk) -> None:
        """Validates one chunk and keeps its pieces."""
        if chunk.region >= len(self._regions):
            raise MalformedMessage(f"chunk for region {chunk.region}; the layout has {len(self._regions)}")
        region = self._regions[chunk.region]
        if region.ordered and chunk.region != self._filling:
            if chunk.region < self._filling:
                raise MalformedMessage(f"chunk of region {chunk.region} after region {self._filling}'s: dense "
                                       "regions come in ascending order")
            for earlier in self._regions[max(self._filling, 0) : chunk.region]:
                if earlier.ordered and not earlier.coverage.complete:
                    raise MalformedMessage(f"chunk of region {chunk.region} before region {earlier.region} "
                                           "was complete")
            self._filling = chunk.region
        region.add(chunk)
        self.received_bytes += len(chunk.data) + (len(chunk.indices) if chunk.indices is not None else 0)

    def finish(self, sparse_values: int) -> None:
        """Raises MalformedMessage unless every region is complete and a sparse push carried ``sparse_values`` pairs."""
        for region in self._regions:
            region.finish()
        if self.codec is not None and self.codec.sparse:
            pairs = sum(region.pairs for region in self._regions)
            if pairs != sparse_values:
                raise MalformedMessage(f"sparse push ended after {pairs} of the {sparse_values} values declared")

    @property
    def expected_bytes(self) -> int | None:
        """The payload bytes of the whole push, where the codec fixes them (None for sparse codecs)."""
        sizes = [region.expected_bytes for region in self._regions]
        return None if None in sizes else sum(sizes)

    @property
    def pieces(self) -> list[Piece]:
        """Every piece received, region by region."""
        return [piece for region in self._regions for piece in region.pieces]
