"""common/codec.py: chunk encoding/decoding, interop with stock protobuf, stream assembly checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers_unit import assemble, field_bytes, field_varint, property_settings, random_regions, same_bytes
from paramhub.common import codec
from paramhub.common.codecs import PushReceiver
from paramhub.common.codec import Chunk, MalformedMessage, RegionAssembler
from paramhub.common.layout import BUFFER, PARAM, Layout, LayoutError, dtype_size
from paramhub.common.pb import paramhub_pb2 as pb

pytestmark = pytest.mark.timeout(60)

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]
FAST = property_settings(40)


def one_region(dtype: torch.dtype, numel: int) -> Layout:
    return Layout.from_entries([("t", dtype, (numel,), PARAM)])


def mixed_layout() -> Layout:
    """Three regions of different dtypes, one of them with a zero-size tensor next to others."""
    return Layout.from_entries([
        ("w", torch.float32, (3, 5), PARAM),
        ("empty", torch.float32, (0,), PARAM),
        ("h", torch.bfloat16, (7,), PARAM),
        ("stat", torch.float16, (9,), BUFFER),
        ("count", torch.int64, (), BUFFER),
    ])


# -- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 2, 7, 1000, 4099])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 100, 4096, 1 << 20])
def test_round_trip_every_dtype_and_size(dtype, numel, chunk_bytes):
    layout = one_region(dtype, numel)
    regions = random_regions(layout, seed=numel)
    messages = list(codec.encoded_chunks(layout, regions, chunk_bytes=chunk_bytes))
    out = assemble(layout, messages)
    assert same_bytes(out[0], regions[0])
    elem = dtype_size(dtype)
    step = max(elem, chunk_bytes - chunk_bytes % elem)
    assert len(messages) == math.ceil(numel * elem / step)


@pytest.mark.parametrize("decode", [codec.decode_push_message, codec.decode_pull_message], ids=["push", "pull"])
def test_round_trip_mixed_layout_with_zero_size_region(decode):
    layout = mixed_layout()
    assert [r.numel for r in layout.regions] == [7, 15, 9, 1]  # bf16 sorts before f32
    zero = Layout.from_entries([("a", torch.float32, (0,), PARAM), ("b", torch.int64, (2,), BUFFER)])
    assert zero.regions[0].numel == 0
    for lay in (layout, zero):
        regions = random_regions(lay, seed=3)
        messages = list(codec.encoded_chunks(lay, regions, chunk_bytes=16))
        out = assemble(lay, messages, decode=decode)
        assert all(same_bytes(a, b) for a, b in zip(out, regions))
    # A zero-size region produces no chunk at all, and the assembler does not wait for one.
    assert [r for r, _, _ in codec.iter_chunks(zero, zero.empty_regions())] == [1]


def test_subset_of_regions_round_trip_and_others_untouched():
    layout = mixed_layout()
    regions = random_regions(layout, seed=5)
    params = layout.region_indices(PARAM)
    messages = list(codec.encoded_chunks(layout, regions, region_ids=params, chunk_bytes=10))
    assert {codec.decode_push_message(m).region for m in messages} == set(params)
    out = assemble(layout, messages, region_ids=params)
    for r in range(len(layout.regions)):
        if r in params:
            assert same_bytes(out[r], regions[r])
        else:
            assert not out[r].any()


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 5, 10, 12, 16, 17, 64])
def test_chunk_boundaries(dtype, chunk_bytes):
    numel = 37
    layout = one_region(dtype, numel)
    regions = random_regions(layout)
    elem = dtype_size(dtype)
    pieces = list(codec.iter_chunks(layout, regions, chunk_bytes=chunk_bytes))
    expected_offset = 0
    for region, offset, data in pieces:
        assert region == 0
        assert offset == expected_offset
        assert len(data) % elem == 0 and len(data) > 0
        # Never bigger than asked for, unless one element is already bigger.
        assert len(data) <= max(chunk_bytes, elem)
        expected_offset += len(data) // elem
    assert expected_offset == numel
    # All but the last chunk are full: the number of messages is minimal.
    assert len({len(d) for _, _, d in pieces[:-1]}) <= 1


def test_iter_chunks_are_views_not_copies():
    layout = one_region(torch.float32, 8)
    regions = [torch.arange(8, dtype=torch.float32)]
    [(_, _, data)] = list(codec.iter_chunks(layout, regions))
    regions[0][0] = 42.0
    assert torch.frombuffer(bytearray(data), dtype=torch.float32)[0] == 42.0


def test_region_bytes_rejects_non_contiguous():
    with pytest.raises(ValueError):
        codec.region_bytes(torch.zeros(10)[::2])


@st.composite
def layouts_and_chunk_sizes(draw):
    n = draw(st.integers(1, 5))
    entries = []
    for i in range(n):
        dtype = draw(st.sampled_from(WIRE_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        role = draw(st.sampled_from([PARAM, BUFFER]))
        entries.append((f"t{i}", dtype, shape, role))
    return Layout.from_entries(entries), draw(st.integers(1, 300)), draw(st.integers(0, 2**16))


@FAST
@given(layouts_and_chunk_sizes())
def test_round_trip_property(case):
    layout, chunk_bytes, seed = case
    regions = random_regions(layout, seed)
    messages = list(codec.encoded_chunks(layout, regions, chunk_bytes=chunk_bytes))
    out = assemble(layout, messages)
    assert all(same_bytes(a, b) for a, b in zip(out, regions))
    # And through the named views: every tensor arrives intact.
    sent, got = layout.views(regions), layout.views(out)
    assert all(same_bytes(sent[name], got[name]) for name in sent)


# -- interop with stock protobuf ---------------------------------------------------------


@FAST
@given(region=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=300))
def test_stock_protobuf_parses_our_encoding(region, offset, data):
    raw = codec.encode_chunk(region, offset, memoryview(data))
    for message_type in (pb.PushMessage, pb.PullMessage):
        msg = message_type.FromString(raw)
        assert msg.WhichOneof("msg") == "chunk"
        assert (msg.chunk.region, msg.chunk.offset, msg.chunk.data) == (region, offset, data)
    chunk = codec.decode_push_message(raw)
    assert (chunk.region, chunk.offset, bytes(chunk.data)) == (region, offset, data)


@FAST
@given(region=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=300))
def test_stock_encoding_decodes_to_same_chunk(region, offset, data):
    for message_type, decode in ((pb.PushMessage, codec.decode_push_message),
                                 (pb.PullMessage, codec.decode_pull_message)):
        raw = message_type(chunk=pb.TensorChunk(region=region, offset=offset, data=data)).SerializeToString()
        chunk = decode(raw)
        assert isinstance(chunk, Chunk)
        assert (chunk.region, chunk.offset, bytes(chunk.data)) == (region, offset, data)


def test_stock_encoding_with_default_fields_omitted():
    raw = pb.PushMessage(chunk=pb.TensorChunk(region=0, offset=0, data=b"\x01\x02\x03\x04")).SerializeToString()
    assert b"\x08" not in raw[:4]  # proto3 leaves region=0/offset=0 out
    assert codec.decode_push_message(raw) == Chunk(0, 0, memoryview(b"\x01\x02\x03\x04"))
    empty = pb.PushMessage(chunk=pb.TensorChunk()).SerializeToString()
    chunk = codec.decode_push_message(empty)
    assert (chunk.region, chunk.offset, bytes(chunk.data)) == (0, 0, b"")


def _chunk_fields(region, offset, data):
    return [field_varint(1, region), field_varint(2, offset), field_bytes(3, data)]


@FAST
@given(region=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=64),
       order=st.permutations(range(3)), unknown=st.lists(st.tuples(st.integers(4, 2000), st.binary(max_size=8)),
                                                         max_size=3), unknown_at=st.integers(0, 3))
def test_unusual_field_order_and_unknown_fields(region, offset, data, order, unknown, unknown_at):
    fields = [_chunk_fields(region, offset, data)[i] for i in order]
    extra = [field_bytes(n, payload) if n % 2 else field_varint(n, len(payload)) for n, payload in unknown]
    inner = b"".join(fields[:unknown_at] + extra + fields[unknown_at:])
    raw = field_bytes(2, inner)
    stock = pb.PushMessage.FromString(raw)
    assert (stock.chunk.region, stock.chunk.offset, stock.chunk.data) == (region, offset, data)
    chunk = codec.decode_push_message(raw)
    assert isinstance(chunk, Chunk)
    assert (chunk.region, chunk.offset, bytes(chunk.data)) == (region, offset, data)


def test_unknown_top_level_field_and_repeated_chunk_field():
    data = b"abcd"
    raw = field_bytes(2, b"".join(_chunk_fields(1, 2, data))) + field_varint(99, 5)
    chunk = codec.decode_push_message(raw)
    assert (chunk.region, chunk.offset, bytes(chunk.data)) == (1, 2, data)
    # The chunk field twice: protobuf merges the two sub-messages (last scalar wins).
    raw = field_bytes(2, field_varint(1, 1) + field_bytes(3, b"xx")) + field_bytes(2, field_varint(2, 9))
    chunk = codec.decode_push_message(raw)
    assert (chunk.region, chunk.offset, bytes(chunk.data)) == (1, 9, b"xx")


def test_headers_decode_to_header_messages():
    push = pb.PushHeader(worker_id=3, incarnation=7, sequence=11, base_version=5, kind=pb.PUSH_KIND_GRADIENT,
                         layout_hash="abc", num_samples=32, loss=0.25)
    got = codec.decode_push_message(pb.PushMessage(header=push).SerializeToString())
    assert isinstance(got, pb.PushHeader) and got == push
    pull = pb.PullHeader(version=9, layout_hash="h", done=True, server_epoch="e")
    got = codec.decode_pull_message(pb.PullMessage(header=pull).SerializeToString())
    assert isinstance(got, pb.PullHeader) and got == pull
    assert codec.encode_message(pb.PullMessage(header=pull)) == pb.PullMessage(header=pull).SerializeToString()
    assert codec.encode_message(b"raw") == b"raw"


# -- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"",  # neither header nor chunk
    b"\x12",  # chunk tag without length
    b"\x12\xff",  # truncated length varint
    b"\x12\x03\x08\x80\x80",  # truncated region varint
    b"\x12\x02\x10\xff",  # truncated offset varint
    b"\x12\x0c\x08" + b"\xff" * 11,  # overlong varint
    b"\x12\x04\x1a\x10ab",  # data length beyond the message
    b"\x12\x10\x1a\x02ab",  # chunk length beyond the message
    b"\x12\x04\x1a\x02a",  # data cut short
    b"garbage!garbage!",
    b"\xff\xff\xff\xff",
    b"\x00\x00",  # field number 0
    field_varint(2, 5),  # chunk with the wrong wire type
], ids=repr)
@pytest.mark.parametrize("decode", [codec.decode_push_message, codec.decode_pull_message], ids=["push", "pull"])
def test_malformed_messages_are_returned_not_raised(raw, decode):
    result = decode(raw)
    assert isinstance(result, MalformedMessage), result


@FAST
@given(st.binary(max_size=64))
def test_decode_never_raises(raw):
    for decode in (codec.decode_push_message, codec.decode_pull_message):
        result = decode(raw)
        assert isinstance(result, (Chunk, MalformedMessage, pb.PushHeader, pb.PullHeader))


@property_settings(200)
@given(data=st.binary(min_size=0, max_size=12), region=st.integers(0, 3), offset=st.integers(0, 300),
       edits=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=3), cut=st.integers(0, 40))
def test_decode_agrees_with_stock_protobuf_on_damaged_messages(data, region, offset, edits, cut):
    """Our fast parser and stock protobuf accept and reject the same bytes, with the same fields."""
    raw = bytearray(codec.encode_chunk(region, offset, data))
    for pos, byte in edits:
        if pos < len(raw):
            raw[pos] = byte
    raw = bytes(raw[: len(raw) - cut % (len(raw) + 1)])
    ours = codec.decode_push_message(raw)
    try:
        stock = pb.PushMessage.FromString(raw)
    except Exception:
        assert isinstance(ours, MalformedMessage)
        return
    if stock.WhichOneof("msg") == "chunk":
        assert isinstance(ours, Chunk), ours
        assert (ours.region, ours.offset, bytes(ours.data)) == (stock.chunk.region, stock.chunk.offset,
                                                                  stock.chunk.data)
    elif stock.WhichOneof("msg") == "header":
        assert ours == stock.header
    else:
        assert isinstance(ours, MalformedMessage)


def test_out_of_range_varints_follow_stock_protobuf():
    """A uint32 region or uint64 offset written with too many bits is read as stock protobuf reads it."""
    inner = field_varint(1, 2**32 + 1) + field_varint(2, 2**64 + 7) + field_bytes(3, b"abcd")
    raw = field_bytes(2, inner)
    stock = pb.PushMessage.FromString(raw)
    chunk = codec.decode_push_message(raw)
    assert (chunk.region, chunk.offset) == (stock.chunk.region, stock.chunk.offset)


def test_decoded_chunk_does_not_copy_payload():
    data = bytes(range(200))
    raw = codec.encode_chunk(0, 0, data)
    chunk = codec.decode_push_message(raw)
    assert chunk.data.obj is raw  # a view into the received message
    assert chunk.data.readonly


# -- the assembler's stream rules -----------------------------------------------------------


def _two_region_stream():
    layout = Layout.from_entries([("a", torch.float32, (10,), PARAM), ("b", torch.int64, (3,), BUFFER)])
    regions = random_regions(layout, seed=1)
    chunks = [Chunk(r, off, memoryview(bytes(d))) for r, off, d in codec.iter_chunks(layout, regions, chunk_bytes=16)]
    return layout, regions, chunks


def _feed(layout, chunks, region_ids=(0, 1)):
    assembler = RegionAssembler(layout, layout.empty_regions(), list(region_ids))
    for chunk in chunks:
        assembler.add(chunk)
    assembler.finish()


def test_assembler_accepts_the_valid_stream():
    layout, regions, chunks = _two_region_stream()
    assert [(c.region, c.offset) for c in chunks] == [(0, 0), (0, 4), (0, 8), (1, 0), (1, 2)]
    out = layout.empty_regions()
    assembler = RegionAssembler(layout, out, [0, 1])
    for c in chunks:
        assembler.add(c)
    assembler.finish()
    assert same_bytes(out[0], regions[0]) and same_bytes(out[1], regions[1])


def _replace(chunk, **kw):
    fields = dict(region=chunk.region, offset=chunk.offset, data=chunk.data)
    fields.update(kw)
    return Chunk(**fields)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: [c[1], c[0]] + c[2:], id="out-of-order"),
    pytest.param(lambda c: c[3:] + c[:3], id="regions-out-of-order"),
    pytest.param(lambda c: [_replace(c[0], region=1)] + c[1:], id="wrong-region"),
    pytest.param(lambda c: [_replace(c[0], region=7)] + c[1:], id="unknown-region"),
    pytest.param(lambda c: [c[0], c[0]] + c[1:], id="duplicate"),
    pytest.param(lambda c: [c[0], _replace(c[1], offset=3)] + c[2:], id="overlap"),
    pytest.param(lambda c: [c[0], c[2]] + c[3:], id="gap"),
    pytest.param(lambda c: c[:2] + [_replace(c[2], data=memoryview(bytes(c[2].data) * 2))] + c[3:], id="overrun"),
    pytest.param(lambda c: c + [_replace(c[4], offset=3)], id="past-the-end"),
    pytest.param(lambda c: c + [c[0]], id="after-complete"),
    pytest.param(lambda c: [_replace(c[0], data=memoryview(bytes(c[0].data)[:6]))] + c[1:], id="partial-element"),
    pytest.param(lambda c: [_replace(c[0], data=memoryview(b""))] + c, id="empty-chunk"),
    pytest.param(lambda c: c[:4], id="incomplete-last-region"),
    pytest.param(lambda c: c[:3], id="missing-region"),
    pytest.param(lambda c: [], id="nothing"),
])
def test_assembler_rejects_broken_streams(mutate):
    layout, _, chunks = _two_region_stream()
    with pytest.raises(MalformedMessage):
        _feed(layout, mutate(chunks))


def test_assembler_rejects_a_partial_element_at_once():
    """The offending chunk itself is refused, before anything is written for it."""
    layout = Layout.from_entries([("a", torch.float32, (4,), PARAM)])
    out = layout.empty_regions()
    assembler = RegionAssembler(layout, out, [0])
    with pytest.raises(MalformedMessage, match="whole number"):
        assembler.add(Chunk(0, 0, memoryview(b"\x01" * 6)))
    assert not out[0].any()
    with pytest.raises(MalformedMessage, match="past the region"):
        assembler.add(Chunk(0, 0, memoryview(b"\x01" * 20)))
    assert not out[0].any()


def test_assembler_only_accepts_expected_regions():
    layout, _, chunks = _two_region_stream()
    with pytest.raises(MalformedMessage):
        _feed(layout, chunks, region_ids=[0])  # region 1 chunks were not asked for
    _feed(layout, [c for c in chunks if c.region == 1], region_ids=[1])


def test_assembler_checks_region_buffers():
    layout, _, _ = _two_region_stream()
    with pytest.raises(LayoutError):
        RegionAssembler(layout, [torch.zeros(10)], [0])
    with pytest.raises(LayoutError):
        RegionAssembler(layout, [torch.zeros(10, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)], [0, 1])


# -- finiteness -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_catches_nan_and_inf(dtype, bad):
    values = torch.ones(5, dtype=dtype)
    assert codec.finite(values) and codec.finite(torch.arange(3))
    values[3] = bad
    assert not codec.finite(values)


def test_finite_overflowing_half_precision():
    assert not codec.finite(torch.tensor([1e5]).to(torch.float16))
    assert codec.finite(torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_finite_values_whose_sum_overflows_are_finite_and_one_bad_value_among_many_is_caught(dtype):
    biggest = torch.finfo(dtype).max
    assert codec.finite(torch.full((1000,), biggest, dtype=dtype))  # the sum is inf; the values are not
    values = torch.randn(100_003).to(dtype)
    assert codec.finite(values)
    for bad in (float("nan"), float("inf")):
        values[77_777] = bad
        assert not codec.finite(values)


def test_push_receiver_views_the_received_bytes_and_checks_them():
    layout = Layout.from_entries([("w", torch.float32, (6,), PARAM), ("n", torch.int64, (2,), BUFFER)])
    regions = [torch.arange(6, dtype=torch.float32), torch.tensor([3, 4])]
    messages = list(codec.encoded_chunks(layout, regions, chunk_bytes=16))
    collector = PushReceiver(None, layout, torch.float32)
    for raw in messages:
        collector.add(codec.decode_push_message(raw))
    collector.finish(0)
    assert [(p.region, p.offset, p.values.tolist()) for p in collector.pieces] == [
        (0, 0, [0.0, 1.0, 2.0, 3.0]), (0, 4, [4.0, 5.0]), (1, 0, [3, 4])]
    regions[0][5] = float("nan")
    bad = PushReceiver(None, layout, torch.float32)
    bad.add(codec.decode_push_message(codec.encode_chunk(0, 0, codec.region_bytes(regions[0][:4]))))
    with pytest.raises(MalformedMessage, match="NaN"):
        bad.add(codec.decode_push_message(codec.encode_chunk(0, 4, codec.region_bytes(regions[0][4:]))))
