"""proto/paramhub.proto is the whole wire contract: an independent client written from its text alone.

The reference client below uses only what the proto's comments say, the
generated stubs (``paramhub_pb2``, ``paramhub_pb2_grpc``, stock protobuf
parsing) and numpy: no ``paramhub.common.codec``, no ``paramhub.common.layout``.
It computes the layout hash by the documented recipe, decodes pulls by the
documented element types and chunk rules, builds pushes by those rules, and
checks the server's answers (the weights it applied, the status codes it
refuses with) against what the proto promises. Expected weights are computed
here with numpy, not read from the server's own arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import fast_timeouts

from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

# -- the reference, from the proto's text ---------------------------------------------------------

MESSAGE_OVERHEAD = 64  # "every message of every RPC is at most max_chunk_bytes + 64 bytes"
HASH_DTYPE = {pb.DTYPE_FLOAT32: "torch.float32", pb.DTYPE_FLOAT16: "torch.float16",
              pb.DTYPE_BFLOAT16: "torch.bfloat16", pb.DTYPE_INT64: "torch.int64"}
HASH_ROLE = {pb.TENSOR_ROLE_PARAM: "param", pb.TENSOR_ROLE_BUFFER: "buffer"}
# little-endian element types; bfloat16 is read as its 16 bits
ELEMENT = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2"),
           pb.DTYPE_BFLOAT16: np.dtype("<u2"), pb.DTYPE_INT64: np.dtype("<i8")}
FLOATING = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
GRAD = pb.PUSH_KIND_GRADIENT


def reference_layout_hash(layout: pb.Layout) -> str:
    """Layout.hash by the recipe in the proto's comment on it."""
    doc = {
        "regions": [[r.name, HASH_DTYPE[r.dtype], HASH_ROLE[r.role], r.numel] for r in layout.regions],
        "tensors": [[t.name, HASH_DTYPE[t.dtype], list(t.shape), t.region, t.offset, HASH_ROLE[t.role]]
                    for t in layout.tensors],
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """binary32 -> bfloat16 bits, rounding to nearest, ties to even (finite values)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> binary32: the bits are the upper half."""
    return (bits.astype("<u4") << 16).view("<f4")


def wire_dtype(join: pb.JoinResponse, region: pb.RegionSpec) -> int:
    """TensorChunk.data: floating regions travel in RunSpec.wire_dtype, integer ones as themselves."""
    return join.run.wire_dtype if region.dtype in FLOATING else region.dtype


def to_wire(values: np.ndarray, dtype: int) -> bytes:
    """Values (float32 or int64) as the little-endian bytes of wire ``dtype``."""
    if dtype == pb.DTYPE_BFLOAT16:
        return bf16_bits(values).tobytes()
    return np.ascontiguousarray(values, dtype=ELEMENT[dtype]).tobytes()


def from_wire(data: bytes, dtype: int) -> np.ndarray:
    """Little-endian bytes of wire ``dtype`` as float32 (floating) or int64 values."""
    raw = np.frombuffer(data, dtype=ELEMENT[dtype])
    if dtype == pb.DTYPE_BFLOAT16:
        return bf16_to_f32(raw)
    return raw.astype(np.float32) if dtype in FLOATING else raw.astype(np.int64)


def dense_chunks(region: int, data: bytes, element: int, sizes: list[int]) -> list[pb.PushMessage]:
    """One region's bytes as chunks of the given element counts, offsets in elements, in order."""
    messages, offset = [], 0
    for count in sizes:
        piece = data[offset * element:(offset + count) * element]
        messages.append(pb.PushMessage(chunk=pb.TensorChunk(region=region, offset=offset, data=piece)))
        offset += count
    assert offset * element == len(data), "the sizes must cover the region"
    return messages


def even_split(numel: int, per_chunk: int) -> list[int]:
    return [min(per_chunk, numel - start) for start in range(0, numel, per_chunk)]


class ReferenceClient:
    """Join, Pull, Push with the generated stubs only."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # gRPC's default 4 MiB limit suffices
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.join_reply: pb.JoinResponse | None = None

    def close(self) -> None:
        self.channel.close()

    def join(self, name: str, incarnation: int = 1, observer: bool = False) -> pb.JoinResponse:
        self.join_reply = self.stub.Join(pb.JoinRequest(worker_name=name, incarnation=incarnation,
                                                        observer=observer), timeout=10)
        return self.join_reply

    def pull(self, min_version: int = 0, frozen: bool = False, timeout: float = 10.0):
        """(header, {region: values}); checks the chunk rules on what arrives. Empty dict: header only."""
        join = self.join_reply
        stream = self.stub.Pull(pb.PullRequest(worker_id=join.worker_id, min_version=min_version,
                                               layout_hash=join.layout.hash, frozen=frozen), timeout=timeout)
        messages = list(stream)
        assert messages[0].WhichOneof("msg") == "header"
        header = messages[0].header
        layout = join.frozen_layout if frozen else join.layout
        chunks = [m.chunk for m in messages[1:]]
        assert all(m.WhichOneof("msg") == "chunk" for m in messages[1:])
        if not chunks:
            return header, {}
        regions = {}
        for r, spec in enumerate(layout.regions):
            dtype = spec.dtype if frozen else wire_dtype(join, spec)  # frozen pulls: the layout's own dtypes
            element = ELEMENT[dtype].itemsize
            mine = [c for c in chunks if c.region == r]
            # the server's split: floor(max_chunk_bytes / element size) elements per chunk, offsets in elements
            per_chunk = join.max_chunk_bytes // element
            assert [c.offset for c in mine] == list(range(0, spec.numel, per_chunk))
            assert [len(c.data) // element for c in mine] == even_split(spec.numel, per_chunk)
            regions[r] = from_wire(b"".join(c.data for c in mine), dtype)
        assert [c.region for c in chunks] == sorted(c.region for c in chunks)  # ascending region index
        return header, regions

    def push_header(self, sequence: int, base_version: int = 0, **fields) -> pb.PushMessage:
        join = self.join_reply
        values = dict(worker_id=join.worker_id, incarnation=1, sequence=sequence, base_version=base_version,
                      kind=GRAD, layout_hash=join.layout.hash, num_samples=1, loss=0.5)
        values.update(fields)
        return pb.PushMessage(header=pb.PushHeader(**values))

    def push(self, messages, timeout: float = 10.0) -> pb.PushResponse:
        return self.stub.Push(iter(messages), timeout=timeout)


@pytest.fixture
def reference():
    clients = []

    def make(port: int) -> ReferenceClient:
        clients.append(ReferenceClient(port))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def server_weights(server) -> list[np.ndarray]:
    """The store's current regions (what the server holds; the expected values are computed here)."""
    return [t.numpy().copy() for t in server.store.snapshot().regions]


def gradient_push(client: ReferenceClient, sequence: int, grad: np.ndarray, sizes: list[int] | None = None,
                  base_version: int = 0) -> list[pb.PushMessage]:
    """A dense gradient push of the mlp's one region, split into ``sizes`` elements (default: the limit)."""
    join = client.join_reply
    dtype = wire_dtype(join, join.layout.regions[0])
    element = ELEMENT[dtype].itemsize
    sizes = sizes or even_split(grad.size, join.max_chunk_bytes // element)
    return [client.push_header(sequence, base_version)] + dense_chunks(0, to_wire(grad, dtype), element, sizes)


# -- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_the_layout_hash_follows_the_documented_recipe(start_server, reference, model):
    server = start_server(model=model, wire_dtype="bf16")
    join = reference(server.port).join("w")
    layout = join.layout
    assert reference_layout_hash(layout) == layout.hash == server.layout.hash
    # the documented construction: one region per (role, dtype), PARAM first, then by "torch.<dtype>"
    order = [(0 if r.role == pb.TENSOR_ROLE_PARAM else 1, HASH_DTYPE[r.dtype]) for r in layout.regions]
    assert order == sorted(order) and len(set(order)) == len(order)
    fill = [0] * len(layout.regions)
    for t in layout.tensors:
        spec = layout.regions[t.region]
        assert (t.dtype, t.role) == (spec.dtype, spec.role)
        assert spec.name == f"{HASH_ROLE[spec.role]}/{HASH_DTYPE[spec.dtype].removeprefix('torch.')}"
        assert t.offset == fill[t.region]
        fill[t.region] += int(np.prod(t.shape, dtype=np.int64))
    assert fill == [r.numel for r in layout.regions]
    # negative control: the hash is over the model's dtypes; the same recipe over the wire dtypes differs
    on_wire = pb.Layout()
    on_wire.CopyFrom(layout)
    for r in on_wire.regions:
        r.dtype = wire_dtype(join, r)
    assert reference_layout_hash(on_wire) != layout.hash
    if model == "resnet18":  # three regions, and scalar tensors (shape [])
        assert [r.name for r in layout.regions] == ["param/float32", "buffer/float32", "buffer/int64"]
        assert any(not t.shape for t in layout.tensors)


# -- pulls -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_a_pull_decodes_as_documented(start_server, reference, wire):
    server = start_server(wire_dtype=wire, chunk_bytes=1024)
    client = reference(server.port)
    join = client.join("w")
    assert join.max_chunk_bytes == 1024
    header, regions = client.pull()  # checks offsets in elements and the server's split of 1024 bytes
    assert (header.version, header.layout_hash, header.done) == (0, join.layout.hash, False)
    assert header.server_epoch == join.server_epoch and len(header.server_epoch) == 12
    weights = server_weights(server)[0]
    expected = {"fp32": weights, "bf16": bf16_to_f32(bf16_bits(weights)),
                "fp16": weights.astype(np.float16).astype(np.float32)}[wire]
    assert regions[0].dtype == np.float32
    np.testing.assert_array_equal(regions[0], expected)
    if wire != "fp32":
        assert not np.array_equal(regions[0], weights)  # the rounding is real: fp32 bytes would not match


def test_a_pull_is_header_only_while_the_version_is_not_reached(start_server, reference):
    server = start_server(timeouts=fast_timeouts(pull_wait=0.3))
    client = reference(server.port)
    client.join("w")
    header, regions = client.pull(min_version=1)
    assert header.version == 0 and not header.done and regions == {}
    header, regions = client.pull(min_version=0)  # control: the version it has, streamed at once
    assert header.version == 0 and set(regions) == {0}


def test_a_pull_answers_before_a_deadline_shorter_than_the_pull_wait(start_server, reference):
    """The server waits min(pull wait, deadline - 1 s): a short deadline gets a header, not DEADLINE_EXCEEDED."""
    server = start_server(timeouts=fast_timeouts(pull_wait=30))
    client = reference(server.port)
    client.join("w")
    started = time.monotonic()
    header, regions = client.pull(min_version=1, timeout=1.6)
    assert header.version == 0 and regions == {}
    assert time.monotonic() - started < 1.6


def test_a_frozen_pull_travels_in_the_frozen_layouts_own_dtypes(start_server, reference):
    server = start_server(wire_dtype="bf16", freeze_backbone=True)
    client = reference(server.port)
    join = client.join("w")
    frozen = join.frozen_layout
    assert frozen.tensors and {t.name for t in join.layout.tensors}.isdisjoint(t.name for t in frozen.tensors)
    header, regions = client.pull(frozen=True, min_version=99)  # min_version is ignored
    assert header.layout_hash == frozen.hash == reference_layout_hash(frozen)
    for r, spec in enumerate(frozen.regions):  # fp32 bytes (4 per element), not the bf16 wire
        np.testing.assert_array_equal(regions[r], server.frozen_regions[r].numpy())


# -- pushes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_a_gradient_built_by_the_chunk_rules_is_applied_as_sgd(start_server, reference, wire):
    server = start_server(wire_dtype=wire, lr=0.5, momentum=0.0, chunk_bytes=1024)  # lr 2^-1: exact products
    client = reference(server.port)
    join = client.join("w")
    w0 = server_weights(server)[0]
    grad = np.random.default_rng(0).standard_normal(w0.size).astype(np.float32)
    numel = join.layout.regions[0].numel
    sizes = [1, 7, 100] + even_split(numel - 108, 200)  # any split by the rules, not only the server's
    reply = client.push(gradient_push(client, 1, grad, sizes))
    assert (reply.outcome, reply.version, reply.next_version) == (pb.PUSH_OUTCOME_ACCEPTED, 1, 1)
    sent = grad if wire == "fp32" else bf16_to_f32(bf16_bits(grad))  # what the wire carried
    expected = w0 - np.float32(0.5) * sent  # one worker, sync: plain SGD on its gradient
    np.testing.assert_array_equal(server_weights(server)[0], expected)  # the server keeps fp32 weights
    header, regions = client.pull(min_version=1)
    assert header.version == 1
    np.testing.assert_array_equal(regions[0], expected if wire == "fp32" else bf16_to_f32(bf16_bits(expected)))


def test_resnet_bf16_wire_integer_buffers_and_a_sparse_push(start_server, reference):
    """bf16 wire: floating regions in bf16, num_batches_tracked as int64; a sparse push sends PARAM as
    (index, value) pairs and the BUFFER regions dense, in region order."""
    server = start_server(model="resnet18", wire_dtype="bf16", lr=0.5, momentum=0.0)
    client = reference(server.port)
    join = client.join("w")
    param, float_buffer, int_buffer = 0, 1, 2
    assert [wire_dtype(join, r) for r in join.layout.regions] == [pb.DTYPE_BFLOAT16] * 2 + [pb.DTYPE_INT64]
    _, pulled = client.pull()
    stored = server_weights(server)
    np.testing.assert_array_equal(pulled[param], bf16_to_f32(bf16_bits(stored[param])))
    np.testing.assert_array_equal(pulled[int_buffer], stored[int_buffer])  # 8 bytes each (checked by decode)

    indices = np.array([0, 3, 1000, join.layout.regions[param].numel - 1], dtype="<u4")
    values = np.array([1.0, -2.0, 0.25, 4.0], dtype=np.float32)  # exact in bf16
    sparse = [pb.PushMessage(chunk=pb.TensorChunk(region=param, indices=indices[:2].tobytes(),
                                                  data=to_wire(values[:2], pb.DTYPE_BFLOAT16))),
              pb.PushMessage(chunk=pb.TensorChunk(region=param, indices=indices[2:].tobytes(),
                                                  data=to_wire(values[2:], pb.DTYPE_BFLOAT16)))]
    running = np.linspace(0.0, 3.0, join.layout.regions[float_buffer].numel, dtype=np.float32)
    tracked = np.full(join.layout.regions[int_buffer].numel, 7, dtype=np.int64)

    def buffers(order):
        chunks = {float_buffer: dense_chunks(float_buffer, to_wire(running, pb.DTYPE_BFLOAT16), 2,
                                             even_split(running.size, 1000)),
                  int_buffer: dense_chunks(int_buffer, to_wire(tracked, pb.DTYPE_INT64), 8, [tracked.size])}
        return [m for r in order for m in chunks[r]]

    # negative control: the same push with the BUFFER regions out of order is refused, nothing applied
    with pytest.raises(grpc.RpcError) as err:
        client.push([client.push_header(1, sparse=True, sparse_values=4)] + sparse
                    + buffers([int_buffer, float_buffer]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.store.version == 0

    # negative control: a sparse push whose chunks carry other than the values its header declares
    # (4: a stream cut short, or one with more than it said) is refused, nothing applied
    for declared in (5, 3):
        with pytest.raises(grpc.RpcError) as err:
            client.push([client.push_header(1, sparse=True, sparse_values=declared)] + buffers([float_buffer])
                        + sparse + buffers([int_buffer]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.store.version == 0

    # sparse chunks may come after the dense ones: here in the middle of the stream
    reply = client.push([client.push_header(1, sparse=True, sparse_values=4)] + buffers([float_buffer]) + sparse
                        + buffers([int_buffer]))
    assert (reply.outcome, reply.version) == (pb.PUSH_OUTCOME_ACCEPTED, 1)
    after = server_weights(server)
    expected_param = stored[param].copy()
    expected_param[indices.astype(np.int64)] -= np.float32(0.5) * values  # every other element counts as zero
    np.testing.assert_array_equal(after[param], expected_param)
    np.testing.assert_array_equal(after[float_buffer], bf16_to_f32(bf16_bits(running)))  # one worker: its values
    np.testing.assert_array_equal(after[int_buffer], tracked)
    _, pulled = client.pull(min_version=1)
    np.testing.assert_array_equal(pulled[int_buffer], tracked)


def _bad_push(client: ReferenceClient, case: str) -> list[pb.PushMessage]:
    """The mlp gradient push with one chunk rule broken (each case a plausible client bug)."""
    join = client.join_reply
    numel = join.layout.regions[0].numel
    good = gradient_push(client, 1, np.ones(numel, dtype=np.float32), sizes=even_split(numel, 128))
    header, chunks = good[0], good[1:]
    if case == "chunks out of order":
        return [header, chunks[1], chunks[0]] + chunks[2:]
    if case in ("offset gap", "overlapping offset"):
        # one element moves between the first two chunks, their offsets kept: the bytes still add up
        # to the region, but the second chunk starts one element after (gap) or before (overlap) the
        # end of the first
        first, second = chunks[0].chunk.data, chunks[1].chunk.data
        if case == "offset gap":
            first, second = first[:-4], first[-4:] + second
        else:
            first, second = first + second[:4], second[4:]
        return [header, pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=0, data=first)),
                pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=128, data=second))] + chunks[2:]
    if case == "offset in bytes":
        return [header] + [pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=m.chunk.offset * 4,
                                                               data=m.chunk.data)) for m in chunks]
    if case == "incomplete stream":
        return [header] + chunks[:-1]
    if case == "partial element":
        last = chunks[-1].chunk
        return [header] + chunks[:-1] + [pb.PushMessage(chunk=pb.TensorChunk(
            region=0, offset=last.offset, data=last.data + b"\0"))]
    if case == "chunk over the message limit":
        data = np.ones(numel, dtype=np.float32).tobytes()
        assert len(data) > join.max_chunk_bytes + MESSAGE_OVERHEAD
        return [header, pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=0, data=data))]
    if case == "sparse chunk in a dense push":
        return [header, pb.PushMessage(chunk=pb.TensorChunk(region=0, indices=np.array([1], "<u4").tobytes(),
                                                            data=to_wire(np.ones(1), pb.DTYPE_FLOAT32)))]
    if case == "dense PARAM chunks in a sparse push":
        sparse_header = client.push_header(1, sparse=True, sparse_values=1)
        return [sparse_header] + chunks
    if case == "NaN":
        data = bytearray(chunks[0].chunk.data)
        data[:4] = np.float32("nan").tobytes()
        return [header, pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=0, data=bytes(data)))] + chunks[1:]
    if case == "wire-dtype layout hash":
        on_wire = pb.Layout()
        on_wire.CopyFrom(join.layout)
        for r in on_wire.regions:
            r.dtype = pb.DTYPE_BFLOAT16
        return [client.push_header(1, layout_hash=reference_layout_hash(on_wire))] + chunks
    raise AssertionError(case)


@pytest.mark.parametrize("case, code", [
    ("chunks out of order", grpc.StatusCode.INVALID_ARGUMENT),
    ("offset gap", grpc.StatusCode.INVALID_ARGUMENT),
    ("overlapping offset", grpc.StatusCode.INVALID_ARGUMENT),
    ("offset in bytes", grpc.StatusCode.INVALID_ARGUMENT),
    ("incomplete stream", grpc.StatusCode.INVALID_ARGUMENT),
    ("partial element", grpc.StatusCode.INVALID_ARGUMENT),
    ("chunk over the message limit", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("sparse chunk in a dense push", grpc.StatusCode.INVALID_ARGUMENT),
    ("dense PARAM chunks in a sparse push", grpc.StatusCode.INVALID_ARGUMENT),
    ("NaN", grpc.StatusCode.INVALID_ARGUMENT),
    ("wire-dtype layout hash", grpc.StatusCode.FAILED_PRECONDITION),
])
def test_a_push_breaking_a_documented_rule_is_refused_and_changes_nothing(start_server, reference, case, code):
    server = start_server(chunk_bytes=1024)
    client = reference(server.port)
    client.join("w")
    w0 = server_weights(server)[0]
    with pytest.raises(grpc.RpcError) as err:
        client.push(_bad_push(client, case))
    assert err.value.code() == code
    assert server.store.version == 0
    np.testing.assert_array_equal(server_weights(server)[0], w0)
    # control: the same push with the rule kept is applied, with the same (not remembered) sequence
    numel = client.join_reply.layout.regions[0].numel
    reply = client.push(gradient_push(client, 1, np.ones(numel, dtype=np.float32), sizes=even_split(numel, 128)))
    assert (reply.outcome, reply.version) == (pb.PUSH_OUTCOME_ACCEPTED, 1)


# -- dedup -------------------------------------------------------------------------------------


def test_dedup_remembers_the_last_sequence_only(start_server, reference):
    server = start_server(lr=0.5, momentum=0.0)
    client = reference(server.port)
    join = client.join("w")
    numel = join.layout.regions[0].numel
    ones = np.ones(numel, dtype=np.float32)
    w0 = server_weights(server)[0]
    first = client.push(gradient_push(client, 1, ones))
    assert first.version == 1
    # a retry of the last sequence: the same reply, applied once; its chunks are not even checked
    assert client.push(gradient_push(client, 1, ones)) == first
    assert client.push([client.push_header(1)]) == first
    np.testing.assert_array_equal(server_weights(server)[0], w0 - np.float32(0.5))
    # sequences may skip numbers; an older one than the last is refused
    assert client.push(gradient_push(client, 5, ones, base_version=1)).version == 2
    with pytest.raises(grpc.RpcError) as err:
        client.push(gradient_push(client, 3, ones, base_version=2))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.store.version == 2
    np.testing.assert_array_equal(server_weights(server)[0], w0 - np.float32(0.5) - np.float32(0.5))


def test_a_concurrent_duplicate_gets_the_originals_reply(start_server, reference):
    """Async, s = 0, two workers: a's push waits for b; a duplicate of it sent meanwhile gets the same
    reply once b has pushed, and a's gradient counts once in the mean."""
    server = start_server(mode="async", staleness=0, workers=2, lr=0.5, momentum=0.0, momentum_correction=False)
    a, b = reference(server.port), reference(server.port)
    a.join("a"), b.join("b")
    b.pull()  # b computes from version 0: a's push must wait for b's (SSP)
    numel = a.join_reply.layout.regions[0].numel
    w0 = server_weights(server)[0]
    grad_a, grad_b = np.full(numel, 1.0, np.float32), np.full(numel, 3.0, np.float32)
    replies = {}

    def send(key):
        replies[key] = a.push(gradient_push(a, 1, grad_a))

    original = threading.Thread(target=send, args=("original",))
    original.start()
    deadline = time.monotonic() + 10
    while server.engine.round_pushes < 1:  # the original waits in the engine
        assert time.monotonic() < deadline, "a's push never started to wait"
        time.sleep(0.01)
    duplicate = threading.Thread(target=send, args=("duplicate",))
    duplicate.start()
    reply_b = b.push(gradient_push(b, 1, grad_b))
    original.join(10), duplicate.join(10)
    assert replies["original"] == replies["duplicate"]
    assert replies["original"].outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert server.store.version == reply_b.version == 1  # one update: a and b applied together, a once
    np.testing.assert_array_equal(server_weights(server)[0], w0 - np.float32(0.5) * np.float32(2.0))


def test_an_observer_s_push_is_refused_and_changes_nothing(start_server, reference):
    server = start_server(lr=0.5, momentum=0.0)
    observer, worker = reference(server.port), reference(server.port)
    observer.join("evaluator", observer=True)
    worker.join("w")
    numel = worker.join_reply.layout.regions[0].numel
    w0 = server_weights(server)[0]
    with pytest.raises(grpc.RpcError) as info:
        observer.push(gradient_push(observer, 1, np.ones(numel, dtype=np.float32)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.store.version == 0
    np.testing.assert_array_equal(server_weights(server)[0], w0)
    assert worker.push(gradient_push(worker, 1, np.ones(numel, dtype=np.float32))).version == 1  # the control


def test_a_pull_from_an_id_this_server_never_saw_joined_is_told_at_once(start_server, reference):
    """After a restart a worker's pull must not wait out the pull wait to learn it: NOT_FOUND, Join again."""
    server = start_server(timeouts=fast_timeouts(pull_wait=30))
    client = reference(server.port)
    join = client.join("w")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Pull(pb.PullRequest(worker_id=join.worker_id + 1, min_version=5), timeout=20))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert time.monotonic() - started < 5
    header, _ = client.pull()  # the control: a joined id, and an anonymous reader, are served
    assert header.version == 0
    anonymous = list(client.stub.Pull(pb.PullRequest(worker_id=0), timeout=10))
    assert anonymous[0].header.version == 0 and len(anonymous) > 1


def test_a_join_reply_larger_than_a_tiny_chunk_size_still_arrives(start_server, reference):
    """The server's replies may exceed max_chunk_bytes + 64 (up to 4 MiB): resnet18's layout is ~5 KB."""
    server = start_server(model="resnet18", num_classes=2, chunk_bytes=1024)
    join = reference(server.port).join("w")
    assert join.max_chunk_bytes == 1024 and join.ByteSize() > 1024 + 64
    assert len(join.layout.tensors) == len(server.layout.tensors)
