"""The checked-in stubs in common/pb are what `make proto` would write from proto/paramhub.proto."""

from __future__ import annotations

import pathlib

import pytest

from paramhub.common.pb import generate

pytestmark = pytest.mark.timeout(60)


def test_checked_in_stubs_are_not_stale(tmp_path):
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.GENERATED)
    stale = [p.name for p in written if p.read_bytes() != (generate.PB_DIR / p.name).read_bytes()]
    assert not stale, f"stubs {stale} differ from proto/paramhub.proto: run `make proto` and commit the result"


def test_generate_follows_the_proto(tmp_path, monkeypatch):
    """The staleness check can fail: a changed proto gives different stubs."""
    proto_dir = tmp_path / "proto"
    proto_dir.mkdir()
    source = (generate.PROTO_DIR / "paramhub.proto").read_text()
    (proto_dir / "paramhub.proto").write_text(source + "\nmessage AddedForTheTest { string note = 1; }\n")
    monkeypatch.setattr(generate, "PROTO_DIR", proto_dir)
    out = tmp_path / "out"
    out.mkdir()
    written = {p.name: p.read_bytes() for p in generate.generate(out)}
    assert b"AddedForTheTest" in written["paramhub_pb2.pyi"]
    assert written["paramhub_pb2.py"] != (generate.PB_DIR / "paramhub_pb2.py").read_bytes()
    assert written["paramhub_pb2.pyi"] != (generate.PB_DIR / "paramhub_pb2.pyi").read_bytes()


def test_stubs_import_inside_the_package():
    """The generated gRPC module imports the message module by its package path."""
    grpc_stub = (generate.PB_DIR / "paramhub_pb2_grpc.py").read_text()
    assert "from paramhub.common.pb import paramhub_pb2" in grpc_stub
    from paramhub.common.pb import paramhub_pb2, paramhub_pb2_grpc

    assert paramhub_pb2.DESCRIPTOR.package == "paramhub.v1"
    assert hasattr(paramhub_pb2_grpc, "ParameterServerStub")
    assert pathlib.Path(paramhub_pb2.__file__).resolve().parent == generate.PB_DIR
