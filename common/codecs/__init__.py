"""The registry of update codecs: built in, or from other packages through entry points.

A codec is named by a spec, ``NAME`` or ``NAME:key=value,...`` (``topk:ratio=0.01``).
Built-in codecs are listed in ``BUILTIN``; another package adds one by declaring
an entry point in the group ``paramhub.codecs`` whose name is the codec's name
and whose object is its ``UpdateCodec`` subclass::

    [project.entry-points."paramhub.codecs"]
    mycodec = "mypackage.mycodec:MyCodec"

Server and workers must both have it installed: the server names its codec in
``RunSpec.codec`` at Join, and refuses pushes in codecs it does not have.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from paramhub.common.codecs.base import (CodecError, DenseReceiver, EncodedPush, ErrorFeedback, PushEncoder,
                                         PushReceiver, RegionEncoding, RegionReceiver, UpdateCodec)
from paramhub.common.codecs.dense import BFloat16, Float16, Float32
from paramhub.common.codecs.int8 import Int8
from paramhub.common.codecs.topk import TopK
from paramhub.common.codecs.topk2bit import TopK2Bit

__all__ = ["BUILTIN", "CodecError", "DenseReceiver", "EncodedPush", "ErrorFeedback", "PushEncoder", "PushReceiver",
           "RegionEncoding", "RegionReceiver", "UpdateCodec", "available", "from_spec", "legacy_spec", "parse_spec"]

log = logging.getLogger("paramhub.codecs")
ENTRY_POINT_GROUP = "paramhub.codecs"
MAX_SPEC_CHARS = 256

BUILTIN: dict[str, type[UpdateCodec]] = {c.name: c for c in (Float32, BFloat16, Float16, TopK, Int8, TopK2Bit)}


@functools.cache
def _plugins() -> dict[str, type[UpdateCodec]]:
    """Codecs other installed packages declare (entry points); one that fails to load is logged and skipped."""
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin must not take the built-in codecs down with it
            log.warning("codec %s (%s) failed to load: %s", entry.name, entry.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, UpdateCodec)) or cls.name != entry.name:
            log.warning("codec entry point %s (%s) is not an UpdateCodec named %s; skipped",
                        entry.name, entry.value, entry.name)
            continue
        if entry.name in BUILTIN:
            log.warning("codec entry point %s (%s) would replace a built-in codec; skipped", entry.name, entry.value)
            continue
        found[entry.name] = cls
    return found


def available() -> dict[str, type[UpdateCodec]]:
    """Every codec this process can use, by name: built-in ones first."""
    return {**BUILTIN, **_plugins()}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:key=value,...]`` as (name, {key: value}); raises CodecError when malformed."""
    if len(spec) > MAX_SPEC_CHARS:
        raise CodecError(f"codec spec of {len(spec)} characters; at most {MAX_SPEC_CHARS}")
    name, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CodecError(f"codec parameter {item!r} is not key=value (in {spec!r})")
        params[key.strip()] = value.strip()
    return name.strip(), params


def from_spec(spec: str) -> UpdateCodec:
    """The codec a spec names, with its parameters; raises CodecError for unknown names or bad values."""
    name, params = parse_spec(spec)
    codecs = available()
    if name not in codecs:
        raise CodecError(f"unknown codec {name!r}; this installation has: {', '.join(codecs)}")
    return codecs[name](**params)


def legacy_spec(wire_dtype: str, topk_ratio: float) -> str:
    """The codec that ``--wire-dtype`` and ``--topk-ratio`` stand for (and a server without RunSpec.codec ran)."""
    return f"topk:ratio={topk_ratio}" if topk_ratio else wire_dtype


def for_header(name: str, sparse: bool) -> UpdateCodec | None:
    """The codec a push header names (None: every region dense in the wire dtype); raises CodecError.

    An unnamed sparse push is top-k, as before headers named codecs.
    """
    if not name:
        return TopK() if sparse else None
    codecs = available()
    if name not in codecs:
        raise CodecError(f"push in codec {name[:64]!r}, which this server does not have ({', '.join(codecs)})")
    codec = codecs[name]()
    if codec.sparse != sparse:
        raise CodecError(f"codec {name} is {'' if codec.sparse else 'not '}sparse, but the header says "
                         f"sparse={sparse}")
    return codec

