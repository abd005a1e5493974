"""How replication travels: a header (kind, version, term, JSON meta) and its payload in chunks.

A payload is tensors laid end to end as raw little-endian bytes; the header's
meta lists them (name, dtype, shape, byte offset). The chunks are the hand-encoded
``TensorChunk`` of common/codec.py (region 0, offset = byte offset into the
payload), one copy on the way out, none on the way in but the copy into the
payload's buffer. No gRPC and no server state here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator

import torch

from paramhub.common import codec
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.consistency import AppliedUpdate, PushResult
from paramhub.ps.ledger import LedgerEntry

ALIGN = 64  # each tensor starts at a multiple of this in the payload, so the receiver's views are aligned
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                   "uint8", "int8", "bool")}
decode_replica_message = codec.make_decoder(pb.ReplicaMessage)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot replicate a tensor of dtype {dtype}")
    return name


def encode(kind: int, version: int, term: int, meta: dict, tensors: dict[str, torch.Tensor],
           chunk_bytes: int) -> Iterator[object]:
    """The messages of one replicated item: its header, then its tensors' bytes in chunks."""
    table, views, offset = [], [], 0
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().reshape(-1)
        view = codec.region_bytes(flat) if flat.numel() else memoryview(b"")
        table.append({"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape),
                      "offset": offset})
        views.append(view)
        padding = -len(view) % ALIGN
        if padding:
            views.append(memoryview(bytes(padding)))
        offset += len(view) + padding
    yield pb.ReplicaMessage(header=pb.ReplicaHeader(kind=kind, version=version, term=term,
                                                    meta=json.dumps(dict(meta, tensors=table)),
                                                    payload_bytes=offset))
    offset = 0
    for view in views:
        for start in range(0, len(view), chunk_bytes):
            yield codec.encode_chunk(0, offset + start, view[start:start + chunk_bytes])
        offset += len(view)


class Assembler:
    """Collects one item's payload from its chunks (in order) and gives its tensors back.

    Raises ``codec.MalformedMessage`` for chunks out of order or past the announced size.
    """

    def __init__(self, header: pb.ReplicaHeader):
        self.header = header
        self.meta = json.loads(header.meta)
        self._buffer = bytearray(header.payload_bytes)
        self._filled = 0

    def add(self, chunk: codec.Chunk) -> None:
        """Copies one chunk's bytes into the payload."""
        n = len(chunk.data)
        if chunk.region != 0 or chunk.offset != self._filled or self._filled + n > len(self._buffer):
            raise codec.MalformedMessage(f"replica chunk at byte {chunk.offset} ({n} bytes) does not follow byte "
                                         f"{self._filled} of {len(self._buffer)}")
        self._buffer[self._filled:self._filled + n] = chunk.data
        self._filled += n

    @property
    def complete(self) -> bool:
        return self._filled == len(self._buffer)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The payload's tensors by name: views of the payload (which no one else writes), no copy."""
        out = {}
        for entry in self.meta["tensors"]:
            dtype = DTYPES[entry["dtype"]]
            shape = entry["shape"]
            numel = 1
            for size in shape:
                numel *= size
            if numel == 0:
                out[entry["name"]] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(self._buffer, dtype=dtype, count=numel, offset=entry["offset"])
            out[entry["name"]] = flat.reshape(shape)
        return out


# -- what the items carry -------------------------------------------------------------


def result_to_json(result: PushResult) -> list:
    return [result.outcome, result.version, result.next_version, result.done, result.reason, result.base_kept]


def result_from_json(item: list) -> PushResult:
    outcome, version, next_version, done, reason, base_kept = item
    return PushResult(outcome, version, next_version, done, reason, base_kept)


def update_meta(update: AppliedUpdate) -> dict:
    """The JSON part of an ``AppliedUpdate`` (its regions travel as the payload)."""
    return {"share": update.share, "loss": update.loss, "pushes": [list(p) for p in update.pushes],
            "entries": [dataclasses.astuple(e) for e in update.entries], "extra": update.extra}


def update_tensors(update: AppliedUpdate) -> dict[str, torch.Tensor]:
    return {str(r): t for r, t in enumerate(update.regions)}


def update_from(assembler: Assembler) -> AppliedUpdate:
    """The ``AppliedUpdate`` an UPDATE item carries."""
    meta, tensors = assembler.meta, assembler.tensors()
    regions = [tensors[str(r)] for r in range(len(tensors))]
    return AppliedUpdate(version=assembler.header.version, regions=regions, share=meta["share"],
                         entries=[LedgerEntry(*e) for e in meta["entries"]], loss=meta["loss"],
                         pushes=[tuple(p) for p in meta["pushes"]], extra=meta["extra"])
