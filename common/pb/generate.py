"""Regenerates the checked-in protobuf and gRPC stubs from proto/paramhub.proto.

Run as ``python -m paramhub.common.pb.generate`` (``make proto``). The proto is
compiled under the virtual path ``paramhub/common/pb/`` so that the generated
``*_pb2_grpc.py`` imports ``from paramhub.common.pb import paramhub_pb2``, which
resolves inside the installed package.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

PB_DIR = pathlib.Path(__file__).resolve().parent
PROTO_DIR = PB_DIR.parent.parent / "proto"
GENERATED = ("paramhub_pb2.py", "paramhub_pb2.pyi", "paramhub_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compiles the proto and writes the generated files into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-Iparamhub/common/pb={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "paramhub/common/pb/paramhub.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / 'paramhub.proto'}")
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(pathlib.Path(tmp) / "paramhub/common/pb" / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(PB_DIR):
        print(f"wrote {path}", file=sys.stderr)
