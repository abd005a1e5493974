"""The contract every registered codec keeps, run over ``codecs.available()``; and the registry itself.

Each codec is checked against references written here, from the bytes it sent:
round trip (what the server decodes, plus what the encoder kept, is what it was
given), error feedback over many pushes, hostile bytes (every mutation refused
or harmless, never an unexpected exception), and convergence of a small
softmax regression against the fp32 run. Negative controls: a top-k that forgets
its residual, a receiver that skips the value checks, and a codec that drops
half of each update are each caught by the same checks.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import textwrap

import pytest
import torch

from paramhub.common import codec as wire
from paramhub.common import codecs
from paramhub.common.codec import MalformedMessage
from paramhub.common.codecs.dense import Float32
from paramhub.common.codecs.topk import TopK
from paramhub.common.config import ServerConfig
from paramhub.common.layout import BUFFER, PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb

CODECS = sorted(codecs.available())
MAX_ABS = 1e8
LAYOUT = Layout.from_entries([
    ("conv", torch.float32, (40, 30), PARAM), ("bias", torch.float32, (7,), PARAM),
    ("half", torch.bfloat16, (50,), PARAM),  # a second PARAM region, in another dtype
    ("running", torch.float32, (9,), BUFFER), ("count", torch.int64, (1,), BUFFER)])
PARAMS = LAYOUT.region_indices(PARAM)
FLOAT_BUFFER, INT_BUFFER = (LAYOUT.regions.index(r) for r in LAYOUT.regions if r.role == BUFFER)
WIDE = next(r for r in PARAMS if LAYOUT.regions[r].dtype == torch.float32)  # conv and bias


def make(name: str) -> codecs.UpdateCodec:
    """The codec with a density high enough for small tensors (top-k style codecs)."""
    cls = codecs.available()[name]
    return cls(ratio="0.1") if "ratio" in cls.PARAMS else cls()


def random_update(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    regions = LAYOUT.empty_regions()
    for r, t in enumerate(regions):
        if t.is_floating_point():
            t.copy_(torch.randn(t.numel(), generator=gen) * 0.1)
        else:
            t.fill_(seed + 3)
    return regions


def receive(messages, header_codec: str, sparse: bool, sparse_values: int, wire_dtype: torch.dtype,
            chunk_bytes: int, receiver_codec=None) -> list[torch.Tensor]:
    """What a server decodes from ``messages``: dense fp32 (or int64) regions; raises MalformedMessage."""
    codec = receiver_codec or codecs.for_header(header_codec, sparse)
    receiver = codecs.PushReceiver(codec, LAYOUT, wire_dtype, max_abs=MAX_ABS, chunk_bytes=chunk_bytes)
    for raw in messages:
        message = wire.decode_push_message(raw)
        if isinstance(message, Exception):
            raise message
        receiver.add(message)
    receiver.finish(sparse_values)
    out = [torch.zeros(r.numel, dtype=torch.float64 if r.dtype.is_floating_point else torch.int64)
           for r in LAYOUT.regions]
    for piece in receiver.pieces:
        assert piece.values.numel()
        if piece.values.is_floating_point():  # integer BUFFERs (num_batches_tracked) are counts, not bounded
            assert torch.isfinite(piece.values).all() and float(piece.values.double().abs().max()) <= MAX_ABS
        if piece.indices is not None:
            assert int(piece.indices.max()) < LAYOUT.regions[piece.region].numel
            out[piece.region].index_add_(0, piece.indices, piece.values.to(out[piece.region].dtype))
        else:
            out[piece.region][piece.offset : piece.offset + piece.values.numel()] += piece.values.to(
                out[piece.region].dtype)
    return out


def encode(encoder: codecs.PushEncoder, update: list[torch.Tensor]) -> tuple[codecs.EncodedPush, list[bytes]]:
    encoded = encoder.encode(update)
    return encoded, list(encoded.messages())


def decode(encoded: codecs.EncodedPush, messages, wire_dtype, chunk_bytes, receiver_codec=None):
    return receive(messages, encoded.codec, encoded.sparse, encoded.sparse_values, wire_dtype, chunk_bytes,
                   receiver_codec)


def rounding(codec: codecs.UpdateCodec) -> float:
    """The relative error a codec without error feedback may make per element."""
    return {"bf16": 2.0**-8, "fp16": 2.0**-11}.get(codec.name, 0.0)


def subnormal_step(codec: codecs.UpdateCodec) -> float:
    """The absolute error a codec's smallest numbers may carry (fp16's subnormals are 2^-24 apart)."""
    return {"fp16": 2.0**-25}.get(codec.name, 0.0)


# -- round trip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [64, 4096])
@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CODECS)
def test_round_trip_decodes_what_was_sent_and_keeps_the_rest(name, wire_dtype, chunk_bytes):
    codec = make(name)
    encoder = codecs.PushEncoder(codec, LAYOUT, wire_dtype, chunk_bytes)
    for seed in range(3):
        before = {r: (encoder.residual(r).clone() if encoder.residual(r) is not None else None) for r in PARAMS}
        update = random_update(seed)
        encoded, messages = encode(encoder, update)
        assert list(encoded.messages()) == messages  # a retry sends the same bytes
        assert (encoded.codec, encoded.sparse) == (codec.name, codec.sparse)
        assert all(len(m) <= chunk_bytes + wire.MESSAGE_OVERHEAD_BYTES for m in messages)
        decoded = decode(encoded, messages, wire_dtype, chunk_bytes)
        for r in PARAMS:
            given = update[r].double() + (before[r].double() if before[r] is not None else 0)
            kept = encoder.residual(r)
            if codec.error_feedback:
                torch.testing.assert_close(decoded[r] + kept.double(), given, rtol=0, atol=1e-6)
            else:
                assert kept is None
                bound = rounding(codec) * given.abs() + subnormal_step(codec)
                assert bool(((decoded[r] - given).abs() <= bound).all()), name
                if codec.lossless:
                    assert torch.equal(decoded[r], given)
        # BUFFER regions travel dense in the wire dtype, whatever the codec
        assert torch.equal(decoded[FLOAT_BUFFER], update[FLOAT_BUFFER].to(wire_dtype).double())
        assert torch.equal(decoded[INT_BUFFER], update[INT_BUFFER])


def test_round_trip_check_rejects_a_top_k_that_forgets_its_residual():
    """Negative control: the error-feedback identity above fails for a codec that drops what it did not send."""

    class Forgetful(TopK):
        def encode(self, ctx, update, state):
            encoding = super().encode(ctx, update, state)
            self.forgotten = state.clone()
            state.zero_()
            return encoding

    codec = Forgetful(ratio="0.1")
    encoder = codecs.PushEncoder(codec, LAYOUT, torch.float32, 4096)
    update = random_update(0)
    encoded, messages = encode(encoder, update)
    decoded = decode(encoded, messages, torch.float32, 4096)
    assert not torch.allclose(decoded[WIDE] + encoder.residual(WIDE).double(), update[WIDE].double(), atol=1e-6)


# -- error feedback -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CODECS if codecs.available()[n].error_feedback])
def test_error_feedback_delivers_everything_over_many_pushes(name):
    """The same update pushed T times: the server receives T × it, less a residual that stays bounded."""
    encoder = codecs.PushEncoder(make(name), LAYOUT, torch.float32, 1024)
    update = random_update(1)
    received = torch.zeros(LAYOUT.regions[WIDE].numel, dtype=torch.float64)
    pushes = 40
    for _ in range(pushes):
        encoded, messages = encode(encoder, update)
        received += decode(encoded, messages, torch.float32, 1024)[WIDE]
    expected = pushes * update[WIDE].double()
    torch.testing.assert_close(received + encoder.residual(WIDE).double(), expected, rtol=1e-5, atol=1e-4)
    # most of it has arrived: the residual is a few pushes' worth, not a growing backlog
    assert float(encoder.residual(WIDE).norm()) < 0.25 * float(expected.norm())


# -- hostile bytes ------------------------------------------------------------------------------------------


def mutations(messages: list[bytes], seed: int):
    """(name, must_refuse, mutated messages) for one valid push."""
    chunks = [pb.PushMessage.FromString(m) for m in messages]
    first_param = next(i for i, m in enumerate(chunks) if m.chunk.region in PARAMS)

    def with_chunk(i, **fields):
        out = list(messages)
        chunk = pb.TensorChunk()
        chunk.CopyFrom(chunks[i].chunk)
        for key, value in fields.items():
            setattr(chunk, key, value)
        out[i] = pb.PushMessage(chunk=chunk).SerializeToString()
        return out

    data = chunks[first_param].chunk.data
    yield "last chunk dropped", True, messages[:-1]
    yield "a chunk twice", True, messages[: first_param + 1] + messages[first_param:]
    yield "one byte short", True, with_chunk(first_param, data=data[:-1])
    yield "one byte more", True, with_chunk(first_param, data=data + b"\x00")
    yield "NaN bytes first", True, with_chunk(first_param, data=b"\xff\xff\xff\xff" + data[4:])
    yield "region beyond the layout", True, with_chunk(first_param, region=len(LAYOUT.regions))
    if len(messages) > first_param + 1 and chunks[first_param + 1].chunk.region == chunks[first_param].chunk.region:
        swapped = list(messages)
        swapped[first_param], swapped[first_param + 1] = swapped[first_param + 1], swapped[first_param]
        yield "two chunks swapped", True, swapped
    rng = random.Random(seed)
    for trial in range(25):
        i = rng.randrange(len(messages))
        raw = bytearray(messages[i])
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        yield f"bits flipped {trial}", False, messages[:i] + [bytes(raw)] + messages[i + 1 :]


def refused(encoded, messages, receiver_codec=None) -> bool:
    """Whether the server refuses the push; anything it accepts must be finite, bounded and in range."""
    try:
        decode(encoded, messages, torch.float32, 256, receiver_codec)
    except MalformedMessage:
        return True
    return False


@pytest.mark.parametrize("name", CODECS)
def test_hostile_bytes_are_refused_or_harmless(name):
    encoder = codecs.PushEncoder(make(name), LAYOUT, torch.float32, 256)
    encoded, messages = encode(encoder, random_update(2))
    assert not refused(encoded, messages)
    for what, must_refuse, mutated in mutations(messages, seed=len(name)):
        outcome = refused(encoded, mutated)  # raises for anything but a clean refusal or a clean push
        if must_refuse:
            assert outcome, f"{name}: {what} was accepted"


def test_hostile_bytes_check_catches_a_receiver_that_skips_value_checks(monkeypatch):
    """Negative control: with the value checks switched off, NaN bytes are no longer refused."""
    encoder = codecs.PushEncoder(Float32(), LAYOUT, torch.float32, 256)
    encoded, messages = encode(encoder, random_update(2))
    nan = next(m for what, _, m in mutations(messages, 0) if what == "NaN bytes first")
    assert refused(encoded, nan)
    monkeypatch.setattr(wire, "check_values", lambda values, max_abs=math.inf: None)
    with pytest.raises(AssertionError):  # what the server would apply is not finite
        refused(encoded, nan)


def test_a_header_naming_an_unknown_codec_or_the_wrong_kind_is_refused():
    with pytest.raises(codecs.CodecError, match="does not have"):
        codecs.for_header("no-such-codec", False)
    with pytest.raises(codecs.CodecError, match="sparse"):
        codecs.for_header("topk", False)
    with pytest.raises(codecs.CodecError, match="sparse"):
        codecs.for_header("int8", True)
    assert codecs.for_header("", False) is None and codecs.for_header("", True).name == "topk"


# -- convergence against fp32 -------------------------------------------------------------------------------

CLASSES, FEATURES = 8, 48
SOFTMAX = Layout.from_entries([("weight", torch.float32, (CLASSES, FEATURES), PARAM),
                               ("bias", torch.float32, (CLASSES,), PARAM)])


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99)) * 0.6
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=gen)
    return centres[labels] + torch.randn(n, FEATURES, generator=gen), labels


def train_softmax(codec: codecs.UpdateCodec, workers: int = 4, steps: int = 60, lr: float = 0.5) -> float:
    """Held-out loss of softmax regression trained by sync SGD on the mean of decoded pushes.

    The loss, not the accuracy: on these clusters accuracy saturates early, where a
    codec losing part of every update still reaches it.
    """
    weights = SOFTMAX.empty_regions()[0].zero_()
    encoders = [codecs.PushEncoder(codec, SOFTMAX, torch.float32, 1024) for _ in range(workers)]
    data = [clusters(steps * 32, seed=w) for w in range(workers)]
    for step in range(steps):
        mean = torch.zeros_like(weights, dtype=torch.float64)
        for w, encoder in enumerate(encoders):
            x, y = (t[step * 32 : (step + 1) * 32] for t in data[w])
            flat = weights.clone().requires_grad_(True)
            w_, b_ = flat[: CLASSES * FEATURES].view(CLASSES, FEATURES), flat[CLASSES * FEATURES :]
            torch.nn.functional.cross_entropy(x @ w_.T + b_, y).backward()
            encoded, messages = encode(encoder, [flat.grad])
            mean += _decode_softmax(encoded, messages)
        weights -= lr * (mean / workers).float()
    x, y = clusters(4096, seed=1000)
    logits = x @ weights[: CLASSES * FEATURES].view(CLASSES, FEATURES).T + weights[CLASSES * FEATURES :]
    return float(torch.nn.functional.cross_entropy(logits, y))


def _decode_softmax(encoded, messages) -> torch.Tensor:
    receiver = codecs.PushReceiver(codecs.for_header(encoded.codec, encoded.sparse), SOFTMAX, torch.float32,
                                   max_abs=MAX_ABS, chunk_bytes=1024)
    for raw in messages:
        receiver.add(wire.decode_push_message(raw))
    receiver.finish(encoded.sparse_values)
    out = torch.zeros(SOFTMAX.regions[0].numel, dtype=torch.float64)
    for piece in receiver.pieces:
        if piece.indices is not None:
            out.index_add_(0, piece.indices, piece.values.double())
        else:
            out[piece.offset : piece.offset + piece.values.numel()] += piece.values.double()
    return out


LOSS_MARGIN = 1.1  # a codec's held-out loss may be at most 10% above fp32's


@pytest.fixture(scope="module")
def fp32_loss() -> float:
    return train_softmax(Float32())


@pytest.mark.parametrize("name", CODECS)
def test_each_codec_trains_as_well_as_fp32(name, fp32_loss):
    loss = train_softmax(make(name))
    assert fp32_loss < 0.2
    assert loss <= fp32_loss * LOSS_MARGIN, (name, loss, fp32_loss)


def test_convergence_check_rejects_a_codec_that_forgets_what_it_did_not_send(fp32_loss):
    """Negative control: top-k without its residual trails fp32 beyond the margin."""

    class Forgetful(TopK):
        def encode(self, ctx, update, state):
            encoding = super().encode(ctx, update, state)
            state.zero_()
            return encoding

    assert train_softmax(Forgetful(ratio="0.1")) > fp32_loss * LOSS_MARGIN


# -- the registry -------------------------------------------------------------------------------------------


def test_specs_parse_and_bad_ones_say_why():
    assert codecs.from_spec("topk:ratio=0.05").spec == "topk:ratio=0.05"
    assert codecs.from_spec(" int8 ").spec == "int8"
    assert codecs.from_spec(codecs.legacy_spec("bf16", 0.0)).name == "bf16"
    assert codecs.from_spec(codecs.legacy_spec("fp32", 0.2)).spec == "topk:ratio=0.2"
    for spec, why in [("nope", "unknown codec"), ("topk:ratio=2", "bad ratio"), ("topk:ratio", "key=value"),
                      ("int8:ratio=0.1", "no parameter ratio"), ("x" * 300, "at most")]:
        with pytest.raises(codecs.CodecError, match=why):
            codecs.from_spec(spec)


def test_server_config_checks_the_codec_and_its_shorthand():
    assert ServerConfig(codec="int8").update_codec.name == "int8"
    assert ServerConfig(topk_ratio=0.1, wire_dtype="bf16").update_codec.spec == "topk:ratio=0.1"
    assert ServerConfig(wire_dtype="fp16").update_codec.name == "fp16"
    with pytest.raises(ValueError, match="shorthand"):
        ServerConfig(codec="topk:ratio=0.1", topk_ratio=0.1)
    with pytest.raises(ValueError, match="unknown codec"):
        ServerConfig(codec="zip")


def test_a_codec_from_another_package_registers_through_an_entry_point(tmp_path, monkeypatch, caplog):
    (tmp_path / "paramhub_plugin_codec.py").write_text(textwrap.dedent("""
        from paramhub.common.codecs.dense import Float32

        class Plugin32(Float32):
            name = "plugin32"

        class Impostor(Float32):
            name = "fp32"
    """))
    info = tmp_path / "paramhub_plugin_codec-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: paramhub-plugin-codec\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [paramhub.codecs]
        plugin32 = paramhub_plugin_codec:Plugin32
        fp32 = paramhub_plugin_codec:Impostor
        missing = paramhub_plugin_codec_gone:Missing
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    codecs._plugins.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="paramhub.codecs"):
            found = codecs.available()
        assert found["plugin32"].__module__ == "paramhub_plugin_codec"
        assert found["fp32"] is Float32  # a plugin cannot replace a built-in codec
        assert "missing" not in found and "failed to load" in caplog.text and "built-in" in caplog.text
        encoder = codecs.PushEncoder(codecs.from_spec("plugin32"), LAYOUT, torch.float32, 256)
        encoded, messages = encode(encoder, random_update(0))
        assert encoded.codec == "plugin32"
        assert torch.equal(decode(encoded, messages, torch.float32, 256)[WIDE], random_update(0)[WIDE].double())
    finally:
        sys.modules.pop("paramhub_plugin_codec", None)
        monkeypatch.undo()
        codecs._plugins.cache_clear()
    assert "plugin32" not in codecs.available()


def test_a_worker_without_the_servers_codec_is_told_at_join():
    from paramhub.worker.client import JoinInfo, RunFailed

    info = JoinInfo(worker_id=1, incarnation=1, model=pb.ModelSpec(), layout=LAYOUT,
                    run=pb.RunSpec(codec="zstd-magic"), version=0, server_epoch="e", max_chunk_bytes=1024, name="w")
    with pytest.raises(RunFailed, match="zstd-magic"):
        info.update_codec()
    assert JoinInfo(**{**info.__dict__, "run": pb.RunSpec(topk_ratio=0.25)}).update_codec().spec == "topk:ratio=0.25"


def test_topk2bit_refuses_malformed_varint_indices():
    """The 2-bit format's own rules (common/codecs/topk2bit.py), each broken once; the valid chunk passes."""
    from paramhub.common.codecs.topk2bit import _HEAD, encode_varints, pack_codes

    codes = pack_codes(torch.tensor([0, 1, 2], dtype=torch.uint8))

    def chunk(n, varints, tail=b"", lo=0.5, hi=1.0):
        return wire.encode_chunk(WIDE, 0, _HEAD.pack(n, lo, hi) + varints + codes + tail)

    def received(message):  # through the region's receiver alone: the rest of a push is not the point here
        from paramhub.common.codecs.base import region_contexts

        receiver = codecs.from_spec("topk2bit").receiver(region_contexts(LAYOUT, torch.float32, 4096)[WIDE], MAX_ABS)
        receiver.add(wire.decode_push_message(message))
        assert receiver.pairs == 3
        return receiver.pieces[0]

    import numpy as np
    good = encode_varints(np.array([4, 1, 7]))
    piece = received(chunk(3, good))
    assert piece.indices.tolist() == [4, 5, 12] and piece.values.tolist() == [0.5, -0.5, 1.0]
    for why, message in [
        ("gap of 0", chunk(3, encode_varints(np.array([4, 0, 7])))),
        ("beyond the region", chunk(3, encode_varints(np.array([LAYOUT.regions[WIDE].numel - 1, 1, 1])))),
        ("beyond 32 bits", chunk(3, b"\xff\xff\xff\xff\x7f" + encode_varints(np.array([1, 1])))),
        ("longer than 5 bytes", chunk(3, b"\x80\x80\x80\x80\x80\x00" + encode_varints(np.array([1, 1])))),
        ("a byte after the codes", chunk(3, good, tail=b"\x00")),
        ("more values declared than sent", chunk(40, good)),
        ("no values", chunk(0, good)),
        ("lo above hi", chunk(3, good, lo=2.0, hi=1.0)),
        ("NaN level", chunk(3, good, hi=float("nan"))),
    ]:
        with pytest.raises(MalformedMessage):
            received(message)
            pytest.fail(why)
