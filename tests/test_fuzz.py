"""Fuzzing the server's decode path: hostile push streams get a clean status and change nothing.

Two fuzzers. The first sends short streams of random headers and chunks. The second
builds complete valid pushes, as a real client sends them (dense fp32, a bf16 wire,
sparse top-k; dry runs), mutates them, and predicts from what it sent whether the
server must refuse the push, answer without applying it, or apply it: then the
weights must have moved by exactly the update it computes itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import fast_timeouts
from paramhub.common import codec
from paramhub.common.config import MAX_UPDATE_ABS, ServerConfig
from paramhub.common.layout import dtype_size
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.screen import MAX_SAMPLES_PER_PUSH
from paramhub.ps.server import PSServer
from paramhub.worker.client import JoinInfo, PSClient

pytestmark = pytest.mark.timeout(240)
# The documented refusals (proto/paramhub.proto, "Identity and retries"); anything else is a bug.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
PUSH_METHOD = "/paramhub.v1.ParameterServer/Push"
# When a message is over the limit, gRPC may end the handler's request stream as if the client had
# finished (about half the tries; otherwise it raises): a push whose messages before that one are a whole
# valid push is then applied, while the client is told RESOURCE_EXHAUSTED. That is the contract of a call
# that fails after sending (its retry answers it: test_after_an_oversized_tail_...), so the fuzzer does
# not predict such pushes. (A sparse push cut short is not whole: PushHeader.sparse_values.)
OVERSIZED_TAIL_MAY_BE_APPLIED = True


@pytest.fixture(scope="module")
def target():
    server = PSServer(ServerConfig(port=0, model="mlp", num_classes=3, workers=1, chunk_bytes=1024,
                                   timeouts=fast_timeouts()))
    server.start()
    client = PSClient(f"127.0.0.1:{server.port}", fast_timeouts())
    client.join("fuzzer")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    push = channel.stream_unary(PUSH_METHOD, request_serializer=codec.encode_message,
                                response_deserializer=pb.PushResponse.FromString)
    yield server, client, push
    channel.close()
    client.close()
    server.shutdown(grace=0)


def headers(info):
    return st.builds(
        lambda **f: pb.PushMessage(header=pb.PushHeader(**f)).SerializeToString(),
        worker_id=st.sampled_from([info.worker_id, 0, 7, 2**32 - 1]),
        incarnation=st.sampled_from([info.incarnation, 0, 1]),
        sequence=st.integers(0, 2**64 - 1), base_version=st.integers(0, 2**64 - 1),
        kind=st.integers(0, 5), layout_hash=st.sampled_from([info.layout.hash, "", "x" * 64]),
        num_samples=st.integers(0, 2**64 - 1), loss=st.floats(allow_nan=True, allow_infinity=True),
        dry_run=st.booleans())


def chunks(layout):
    numel = layout.regions[0].numel
    return st.builds(lambda region, offset, data: codec.encode_chunk(region, offset, data),
                     region=st.integers(0, 3), offset=st.integers(0, numel + 4),
                     data=st.binary(min_size=0, max_size=64)) | st.binary(max_size=80)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_push_streams_get_a_clean_status_and_change_nothing(target, data):
    server, client, push = target
    info = client.info
    stream = data.draw(st.lists(headers(info) | chunks(info.layout), min_size=0, max_size=6))
    before = server.store.snapshot()
    try:
        reply = push(iter(stream), timeout=10)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        assert server.store.version == before.version
    else:  # only a dry run of a complete, valid push can succeed with such short streams
        assert reply.outcome == pb.PUSH_OUTCOME_VALIDATED or server.store.version > before.version


def test_the_server_still_serves_after_fuzzing(target):
    server, client, _ = target
    regions = client.info.layout.empty_regions()
    assert client.pull(regions).version == server.store.version
    assert torch.isfinite(regions[0]).all()


# -- complete pushes, mutated ------------------------------------------------------------------------

LR = 0.1  # the start_server fixture's SGD: lr 0.1, no momentum, no weight decay
CHUNK_BYTES = 1024  # a complete mlp push is 7 to 14 chunks
RUNS = {"fp32": dict(wire_dtype="fp32"), "bf16": dict(wire_dtype="bf16"),
        "topk": dict(wire_dtype="fp32", topk_ratio=0.1)}


@dataclasses.dataclass
class Part:
    """One chunk message as fields; ``keep`` sends only that many of its bytes."""

    region: int
    offset: int
    data: bytes
    indices: bytes = b""  # sparse chunks only
    keep: int | None = None

    def encode(self) -> bytes:
        if not self.indices:  # the bytes a real client sends (codec.encode_chunk)
            raw = codec.encode_chunk(self.region, self.offset, self.data)
        else:
            raw = pb.PushMessage(chunk=pb.TensorChunk(region=self.region, offset=self.offset, data=self.data,
                                                      indices=self.indices)).SerializeToString()
        return raw if self.keep is None else raw[: self.keep]


@dataclasses.dataclass
class HeaderCopy:
    """The push's header message in the stream; ``keep`` sends only that many of its bytes."""

    keep: int | None = None


@dataclasses.dataclass
class Push:
    """A push being mutated: one header (its fields) and the stream of messages that carry it and the chunks."""

    header: pb.PushHeader
    stream: list  # HeaderCopy and Part items, in the order they are sent

    @property
    def parts(self) -> list[Part]:
        return [m for m in self.stream if isinstance(m, Part)]

    def messages(self) -> list[bytes]:
        header = pb.PushMessage(header=self.header).SerializeToString()
        return [m.encode() if isinstance(m, Part) else header[: m.keep] if m.keep is not None else header
                for m in self.stream]


@dataclasses.dataclass
class Run:
    """One server under fuzzing, and what a client knows of it."""

    server: PSServer
    call: Callable  # the Push method of a plain channel: takes an iterator of serialized messages
    info: JoinInfo
    wire_dtype: torch.dtype
    topk_ratio: float
    last_sequence: int = 0  # of the last push the engine handled (applied or dropped)
    last_reply: pb.PushResponse | None = None  # its reply, which a retry must get again

    @property
    def numel(self) -> int:
        return self.info.layout.regions[0].numel

    def weights(self) -> tuple[int, torch.Tensor]:
        with self.server.store.reading() as snap:  # its memory is not reused while we copy
            return snap.version, snap.regions[0].clone()


def push_call(channel):
    return channel.stream_unary(PUSH_METHOD, request_serializer=codec.encode_message,
                                response_deserializer=pb.PushResponse.FromString)


@pytest.fixture(params=sorted(RUNS))
def run(request, start_server):
    options = RUNS[request.param]
    server = start_server(chunk_bytes=CHUNK_BYTES, **options)
    with PSClient(f"127.0.0.1:{server.port}", fast_timeouts()) as client:
        info = client.join("fuzzer")
    assert [r.role for r in info.layout.regions] == ["param"]  # the oracle below knows one PARAM region
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Run(server, push_call(channel), info, codec.WIRE_DTYPES[options["wire_dtype"]],
                  options.get("topk_ratio", 0.0))


def valid_push(run: Run, seed: int) -> Push:
    """What a real client sends (worker/client.py PSClient.push): the header, then the update's chunks."""
    version, _ = run.weights()
    info = run.info
    sparse = run.topk_ratio > 0
    header = pb.PushHeader(worker_id=info.worker_id, incarnation=info.incarnation, sequence=run.last_sequence + 1,
                           base_version=version, kind=pb.PUSH_KIND_GRADIENT, layout_hash=info.layout.hash,
                           num_samples=8, loss=1.25, sparse=sparse)
    gen = torch.Generator().manual_seed(seed)
    update = (torch.randn(run.numel, generator=gen) * 0.01).to(run.wire_dtype)
    if sparse:  # as top-k sends it (worker/compression.py): increasing indices, one value each
        indices = torch.randperm(run.numel, generator=gen)[: math.ceil(run.topk_ratio * run.numel)].sort().values
        parts = [Part(m.chunk.region, m.chunk.offset, m.chunk.data, m.chunk.indices)
                 for m in map(pb.PushMessage.FromString,
                              codec.encoded_sparse_chunks(0, indices, update[indices], CHUNK_BYTES))]
        header.sparse_values = len(indices)
    else:
        parts = [Part(r, offset, bytes(view))
                 for r, offset, view in codec.iter_chunks(info.wire_layout, [update], None, CHUNK_BYTES)]
    return Push(header, [HeaderCopy(), *parts])


def _values(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype)


def _indices(part: Part) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(part.indices, dtype=np.uint32).astype(np.int64))


# -- the oracle: what the server must do with a push, judged from what was sent ----------------------

REFUSED, UNCHANGED, APPLIED = "refused", "unchanged", "applied"


def well_formed(push: Push, run: Run) -> bool:
    """The wire contract for the chunks (proto/paramhub.proto TensorChunk, PushHeader.sparse), restated.

    Dense: chunks of region 0 in order, each a whole number of wire elements, covering it
    exactly. Sparse: every chunk of region 0 with one value per uint32 index, indices
    strictly increasing across the push and inside the region, as many values in all as
    the header's sparse_values. Nothing may be cut, and no second header may come.
    """
    stream = push.stream[1:]
    if any(not isinstance(m, Part) or m.keep is not None for m in stream):
        return False
    elem, filled, last = dtype_size(run.wire_dtype), 0, -1
    for p in stream:
        if p.region != 0 or bool(p.indices) != push.header.sparse:
            return False
        if push.header.sparse:
            if len(p.indices) % 4 or len(p.data) != len(p.indices) // 4 * elem:
                return False
            indices = _indices(p)
            if int(indices[0]) <= last or bool((indices.diff() <= 0).any()) or int(indices[-1]) >= run.numel:
                return False
            last = int(indices[-1])
        else:
            if p.offset * elem != filled or not p.data or len(p.data) % elem or filled + len(p.data) > run.numel * elem:
                return False
            filled += len(p.data)
    if push.header.sparse:  # a whole sparse push carries exactly the values its header declares
        return sum(len(p.indices) // 4 for p in stream) == push.header.sparse_values
    return filled == run.numel * elem


def update_of(push: Push, run: Run) -> torch.Tensor:
    """The dense fp32 update a well-formed push carries."""
    if not push.header.sparse:
        return torch.cat([_values(p.data, run.wire_dtype) for p in push.parts]).float()
    update = torch.zeros(run.numel)
    for p in push.parts:
        update[_indices(p)] = _values(p.data, run.wire_dtype).float()
    return update


def expected_outcome(push: Push, run: Run, version: int) -> str:
    """Refuse, answer without applying, or apply: in the server's order.

    Transport limits first, then the header, deduplication (a retry is answered from
    the first reply without reading its chunks), the chunks, dry run, then the engine
    (sequence and base version).
    """
    h, info = push.header, run.info
    if any(len(m) > CHUNK_BYTES + codec.MESSAGE_OVERHEAD_BYTES for m in push.messages()):
        return REFUSED  # gRPC's receive limit
    if not push.stream or push.stream[0] != HeaderCopy():
        return REFUSED
    if (h.worker_id, h.incarnation) != (info.worker_id, info.incarnation):
        return REFUSED
    if (h.layout_hash != info.layout.hash or h.kind != pb.PUSH_KIND_GRADIENT
            or not 1 <= h.num_samples <= MAX_SAMPLES_PER_PUSH or not math.isfinite(h.loss) or h.sequence < 1
            or (h.sparse_values and not h.sparse)):
        return REFUSED
    if h.sequence == run.last_sequence:
        return UNCHANGED  # a retry
    if not well_formed(push, run):
        return REFUSED
    update = update_of(push, run)
    if not torch.isfinite(update).all() or update.abs().max() > MAX_UPDATE_ABS:  # the screen's bound
        return REFUSED
    if h.dry_run:
        return UNCHANGED
    if h.sequence < run.last_sequence or h.base_version > version:
        return REFUSED
    if h.base_version < version:
        return UNCHANGED  # its round has closed: dropped
    return APPLIED


def reference_step(weights: torch.Tensor, push: Push, run: Run) -> torch.Tensor:
    """The weights after the server applies ``push``, by the operations of WeightedMean and sgd_step."""
    n = float(push.header.num_samples)
    mean = torch.zeros_like(weights)
    if push.header.sparse:
        for p in push.parts:
            mean.index_add_(0, _indices(p), _values(p.data, run.wire_dtype).float(), alpha=n)
    else:
        mean.add_(update_of(push, run), alpha=n)
    mean.div_(n)
    return torch.add(weights, mean, alpha=-LR)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def send_and_check(run: Run, push: Push, oracle: Run | None = None) -> str:
    """Sends ``push`` and checks that the server did exactly what the oracle says; returns that.

    ``oracle`` is what the oracle believes about the run (default: ``run``; the negative control lies).
    """
    oracle = oracle or run
    version, before = run.weights()
    expected = expected_outcome(push, oracle, version)
    if OVERSIZED_TAIL_MAY_BE_APPLIED:
        oversized = [i for i, m in enumerate(push.messages()) if len(m) > CHUNK_BYTES + codec.MESSAGE_OVERHEAD_BYTES]
        if oversized:
            prefix = dataclasses.replace(push, stream=push.stream[: oversized[0]])
            assume(expected_outcome(prefix, oracle, version) == REFUSED)
    if expected == APPLIED:
        reference = reference_step(before, push, oracle)
        assert torch.isfinite(reference).all(), "the screen's bounds let through a push that makes the weights inf"
    try:
        reply = run.call(iter(push.messages()), timeout=10)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        assert expected == REFUSED, f"refused with {err.code().name} ({err.details()}); expected {expected}"
        after_version, after = run.weights()
        assert after_version == version and identical(after, before), "a refused push changed the model"
        return REFUSED
    assert expected != REFUSED, f"accepted a push that should have been refused: {reply}"
    after_version, after = run.weights()
    h = push.header
    if expected == APPLIED:
        assert (reply.outcome, reply.version, after_version) == (pb.PUSH_OUTCOME_ACCEPTED, version + 1, version + 1)
        assert identical(after, reference), "the weights did not move by exactly the update sent"
    else:
        assert after_version == version and identical(after, before), "a push answered without applying moved"
        if h.sequence == oracle.last_sequence:
            assert reply == oracle.last_reply, "a retry got another reply than the first time"
        else:
            assert reply.outcome == (pb.PUSH_OUTCOME_VALIDATED if h.dry_run else pb.PUSH_OUTCOME_DROPPED)
    if expected == APPLIED or (expected == UNCHANGED and not h.dry_run and h.sequence != oracle.last_sequence):
        run.last_sequence, run.last_reply = h.sequence, reply  # the engine took it: the next retry gets this
    return expected


# -- mutations: each edits the push in place ------------------------------------------------------

def _some_part(push: Push, draw) -> Part | None:
    parts = push.parts
    return draw(st.sampled_from(parts)) if parts else None


def write_value(push: Push, run: Run, draw) -> None:
    """Writes NaN, ±inf, a huge finite value (3e38, the dtype's largest) or a plain one into a payload."""
    part = _some_part(push, draw)
    elem = dtype_size(run.wire_dtype)
    if part is None or len(part.data) < elem:
        return
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, torch.finfo(run.wire_dtype).max,
                                  1e30, 2 * MAX_UPDATE_ABS, MAX_UPDATE_ABS, -5.0, 0.0]))
    i = draw(st.integers(0, len(part.data) // elem - 1)) * elem
    raw = torch.tensor([value]).to(run.wire_dtype).view(torch.uint8).numpy().tobytes()
    part.data = part.data[:i] + raw + part.data[i + elem:]


def flip_payload_bytes(push: Push, run: Run, draw) -> None:
    """XORs a few payload bytes: the values change, the chunk stays well-formed."""
    for _ in range(draw(st.integers(1, 4))):
        part = _some_part(push, draw)
        if part is None or not part.data:
            return
        i = draw(st.integers(0, len(part.data) - 1))
        part.data = part.data[:i] + bytes([part.data[i] ^ draw(st.integers(1, 255))]) + part.data[i + 1:]


def set_header_field(push: Push, run: Run, draw) -> None:
    """Gives one header field another value, valid or not: the oracle judges the final header."""
    h, last, version = push.header, run.last_sequence, push.header.base_version
    choices = {
        "worker_id": [h.worker_id + 1, 0, 2**32 - 1],
        "incarnation": [h.incarnation - 1, h.incarnation + 1, 0],
        "sequence": [0, last, max(0, last - 1), last + 7, 2**63],
        "base_version": [version + 1, max(0, version - 1), 2**64 - 1],
        "kind": [pb.PUSH_KIND_UNSPECIFIED, pb.PUSH_KIND_DELTA, 9],
        "layout_hash": ["", "0" * 64, h.layout_hash.upper()],
        "num_samples": [0, 1, 3, 7, MAX_SAMPLES_PER_PUSH, MAX_SAMPLES_PER_PUSH + 1, 2**64 - 1],
        "loss": [math.nan, math.inf, -math.inf, 0.0, 1e300],
        "sparse": [not h.sparse],
        "sparse_values": [0, 1, max(0, h.sparse_values - 1), h.sparse_values + 1, 2**64 - 1],
        "dry_run": [True],
        "keeps_base": [True],  # sync rounds ignore it
    }
    field = draw(st.sampled_from(sorted(choices)))
    setattr(h, field, draw(st.sampled_from(choices[field])))


def drop_messages(push: Push, run: Run, draw) -> None:
    """Drops one message (a chunk or the header) or the last few: truncation."""
    if not push.stream:
        return
    if draw(st.booleans()):
        del push.stream[draw(st.integers(0, len(push.stream) - 1))]
    else:
        del push.stream[len(push.stream) - draw(st.integers(1, len(push.stream))):]


def duplicate_message(push: Push, run: Run, draw) -> None:
    if push.stream:
        i = draw(st.integers(0, len(push.stream) - 1))
        push.stream.insert(draw(st.integers(0, len(push.stream))), dataclasses.replace(push.stream[i]))


def swap_messages(push: Push, run: Run, draw) -> None:
    if len(push.stream) >= 2:
        i, j = draw(st.lists(st.integers(0, len(push.stream) - 1), min_size=2, max_size=2, unique=True))
        push.stream[i], push.stream[j] = push.stream[j], push.stream[i]


def set_region(push: Push, run: Run, draw) -> None:
    part = _some_part(push, draw)
    if part is not None:
        part.region = draw(st.sampled_from([1, 2, 7, 2**32 - 1]))


def set_offset(push: Push, run: Run, draw) -> None:
    """Moves a chunk: a dense one then overlaps or leaves a gap; sparse chunks place values by index."""
    part = _some_part(push, draw)
    if part is not None:
        part.offset = draw(st.sampled_from([o for o in (0, part.offset + 1, part.offset - 1, run.numel, 2**63)
                                            if o >= 0 and o != part.offset]))


def resize_data(push: Push, run: Run, draw) -> None:
    """Adds or removes payload bytes of a chunk: part of an element, or whole elements."""
    part = _some_part(push, draw)
    if part is not None:
        elem = dtype_size(run.wire_dtype)
        delta = draw(st.sampled_from([-elem, -1, 1, 3, elem]))
        part.data = part.data[:delta] if delta < 0 else part.data + b"\x00" * delta


def retype_data(push: Push, run: Run, draw) -> None:
    """Sends one chunk's values in a dtype of another width than the wire's."""
    part = _some_part(push, draw)
    if part is not None and len(part.data) % dtype_size(run.wire_dtype) == 0:
        other = draw(st.sampled_from([torch.float16, torch.bfloat16] if run.wire_dtype == torch.float32
                                     else [torch.float32, torch.float64]))
        part.data = _values(part.data, run.wire_dtype).to(other).view(torch.uint8).numpy().tobytes()


def set_sparse_index(push: Push, run: Run, draw) -> None:
    """Sets one index of a sparse chunk to a repeat, the region's end, the largest uint32, or another value."""
    part = _some_part(push, draw)
    if part is not None and part.indices and len(part.indices) % 4 == 0:
        indices = np.frombuffer(part.indices, dtype=np.uint32).copy()
        i = draw(st.integers(0, len(indices) - 1))
        indices[i] = draw(st.sampled_from([int(indices[i - 1]), run.numel, 2**32 - 1, int(indices[i]) + 1]))
        part.indices = indices.tobytes()


def oversize_chunk(push: Push, run: Run, draw) -> None:
    """Makes one chunk four times the server's chunk limit."""
    part = _some_part(push, draw)
    if part is not None:
        part.data = part.data * (4 * CHUNK_BYTES // max(1, len(part.data)) + 1)


def cut_message(push: Push, run: Run, draw) -> None:
    """Sends one message (a chunk or the header) truncated."""
    if push.stream:
        i = draw(st.integers(0, len(push.stream) - 1))
        length = len(push.messages()[i])
        push.stream[i] = dataclasses.replace(push.stream[i], keep=draw(st.integers(0, max(0, length - 1))))


# Each example applies one mutation of its family, then up to two of any kind; every run takes every family.
FAMILIES = {
    "values": [write_value, flip_payload_bytes],
    "header": [set_header_field],
    "order": [drop_messages, duplicate_message, swap_messages],
    "fields": [set_region, set_offset, resize_data, retype_data, set_sparse_index],
    "framing": [oversize_chunk, cut_message],
}
MUTATIONS = [m for family in FAMILIES.values() for m in family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_complete_pushes_are_applied_exactly_or_refused_changing_nothing(run, family, data):
    push = valid_push(run, data.draw(st.integers(0, 2**31), label="seed"))
    push.header.dry_run = data.draw(st.sampled_from([False, False, False, True]), label="dry run")
    mutations = [data.draw(st.sampled_from(FAMILIES[family]), label="mutation")]
    mutations += data.draw(st.lists(st.sampled_from(MUTATIONS), max_size=2), label="more mutations")
    for mutation in mutations:
        mutation(push, run, data.draw)
        event(mutation.__name__)
    outcome = send_and_check(run, push)
    event(f"{'dry run ' if push.header.dry_run else ''}{outcome}")
    if outcome != APPLIED:
        if run.last_sequence:  # a retry of the last push the engine took still gets its reply
            retry = valid_push(run, seed=1)
            retry.header.sequence = run.last_sequence
            assert send_and_check(run, retry) == UNCHANGED
        assert send_and_check(run, valid_push(run, seed=1)) == APPLIED  # and a normal push is applied


def test_the_checker_fails_when_the_server_does_other_than_the_oracle_says(start_server):
    """Negative control: an oracle told the wrong worker, or the wrong last push, must see the server disagree."""
    server = start_server(chunk_bytes=CHUNK_BYTES)
    with PSClient(f"127.0.0.1:{server.port}", fast_timeouts()) as client:
        info = client.join("fuzzer")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        run = Run(server, push_call(channel), info, torch.float32, 0.0)
        assert send_and_check(run, valid_push(run, seed=0)) == APPLIED
        stranger = dataclasses.replace(run, info=dataclasses.replace(info, worker_id=info.worker_id + 1))
        with pytest.raises(AssertionError, match="should have been refused"):  # the server applied it
            send_and_check(run, valid_push(run, seed=0), oracle=stranger)
        forgetful = dataclasses.replace(run, last_sequence=0)
        with pytest.raises(AssertionError):  # a retry of push 2: answered from its first reply, not applied
            send_and_check(run, valid_push(forgetful, seed=0), oracle=forgetful)


def test_after_an_oversized_tail_the_retry_settles_the_push_exactly_once(start_server):
    """A whole push followed by a message over the limit: the client sees RESOURCE_EXHAUSTED, but gRPC
    may have ended the handler's stream cleanly first (about half the tries), so the push may have been
    applied. That is the contract for any call that fails after sending (proto: "Identity and retries"):
    the retry with the same sequence answers it, and the push counts exactly once either way."""
    server = start_server(chunk_bytes=CHUNK_BYTES, metrics_port=0)
    with PSClient(f"127.0.0.1:{server.port}", fast_timeouts()) as client:
        info = client.join("w")
    received = lambda: server.metrics.prometheus.get_sample_value("paramhub_received_bytes_total") or 0.0  # noqa: E731
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = push_call(channel)
        run = Run(server, call, info, torch.float32, 0.0)
        for sequence in range(1, 11):  # gRPC takes either path at random: ten tries
            push = valid_push(run, seed=sequence)
            push.header.sequence = sequence
            push.header.base_version = sequence - 1
            _, before = run.weights()

            def stream():
                start = received()
                yield from push.messages()
                for _ in range(500):  # at most 5 s: until the server has read the whole push
                    if received() >= start + info.wire_layout.nbytes:
                        break
                    time.sleep(0.01)
                yield codec.encode_chunk(0, run.numel, b"\0" * (4 * CHUNK_BYTES))

            with pytest.raises(grpc.RpcError) as err:
                call(stream(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.store.version in (sequence - 1, sequence)  # applied or not, never twice
            reply = call(iter(push.messages()), timeout=10)  # the retry, without the tail
            assert reply.outcome == pb.PUSH_OUTCOME_ACCEPTED and server.store.version == sequence
            assert identical(run.weights()[1], reference_step(before, push, run)), f"try {sequence}"
