"""The flat parameter layout: where every tensor of the model lives on the wire.

The model's state travels as a few flat buffers ("regions"), one per (role, dtype):
trainable parameters in one, float buffers (BatchNorm running statistics) in
another, integer buffers (``num_batches_tracked``) in a third. A ``Layout`` records
each tensor's name, dtype, shape, region and element offset, and a hash that both
ends compare before any bytes are trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from paramhub.common.pb import paramhub_pb2 as pb

PARAM = "param"
BUFFER = "buffer"

# torch dtype <-> wire enum. Little-endian raw bytes of these types travel as is.
DTYPE_TO_WIRE = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int64: pb.DTYPE_INT64,
}
WIRE_TO_DTYPE = {wire: dtype for dtype, wire in DTYPE_TO_WIRE.items()}
_ROLE_TO_WIRE = {PARAM: pb.TENSOR_ROLE_PARAM, BUFFER: pb.TENSOR_ROLE_BUFFER}
_WIRE_TO_ROLE = {wire: role for role, wire in _ROLE_TO_WIRE.items()}


class LayoutError(ValueError):
    """A layout (or a state that should match one) is malformed or does not agree."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One contiguous flat buffer of a single dtype and role."""

    name: str
    dtype: torch.dtype
    role: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lives: its region and element offset."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    region: int
    offset: int
    role: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def _region_order(role: str, dtype: torch.dtype) -> tuple[int, str]:
    return (0 if role == PARAM else 1, str(dtype))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The regions and tensor slots of a model's state, plus their hash."""

    regions: tuple[Region, ...]
    tensors: tuple[TensorSlot, ...]

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> "Layout":
        """Builds the layout of ``model.state_dict()``.

        Args:
            model: the model; its parameters become PARAM tensors, everything
                else in the state_dict (BatchNorm statistics) BUFFER tensors.
            names: if given, only these state_dict keys are laid out (fine-tuning
                a head sends only the head).
        """
        return cls.from_state(model.state_dict(), {name for name, _ in model.named_parameters()}, names)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], param_names: Iterable[str],
                   names: Iterable[str] | None = None) -> "Layout":
        """``from_model`` given the model's state_dict and the names of its parameters."""
        param_names = set(param_names)
        wanted = set(state) if names is None else set(names)
        unknown = wanted - set(state)
        if unknown:
            raise LayoutError(f"not in the model's state_dict: {sorted(unknown)[:5]}")
        entries = [
            (name, tensor.dtype, tuple(tensor.shape), PARAM if name in param_names else BUFFER)
            for name, tensor in state.items()
            if name in wanted
        ]
        return cls.from_entries(entries)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], str]]) -> "Layout":
        """Builds a layout from (name, dtype, shape, role) in state_dict order."""
        entries = list(entries)
        names = [name for name, _, _, _ in entries]
        if len(set(names)) != len(names):
            raise LayoutError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})[:5]}")
        for name, dtype, shape, role in entries:
            if any(int(s) < 0 for s in shape):
                raise LayoutError(f"{name}: negative dimension in shape {tuple(shape)}")
            if dtype not in DTYPE_TO_WIRE:
                raise LayoutError(f"{name}: dtype {dtype} cannot travel on the wire")
            if role not in (PARAM, BUFFER):
                raise LayoutError(f"{name}: unknown role {role!r}")
        keys = sorted({(role, dtype) for _, dtype, _, role in entries}, key=lambda k: _region_order(*k))
        index = {key: i for i, key in enumerate(keys)}
        fill = [0] * len(keys)
        tensors = []
        for name, dtype, shape, role in entries:
            r = index[(role, dtype)]
            slot = TensorSlot(name, dtype, tuple(int(s) for s in shape), r, fill[r], role)
            fill[r] += slot.numel
            tensors.append(slot)
        regions = tuple(
            Region(f"{role}/{str(dtype).removeprefix('torch.')}", dtype, role, fill[i])
            for i, (role, dtype) in enumerate(keys)
        )
        return cls(regions, tuple(tensors))

    # -- identity -----------------------------------------------------------------

    @functools.cached_property
    def hash(self) -> str:
        """Hex SHA-256 over a canonical description of regions and tensors."""
        doc = {
            "regions": [[r.name, str(r.dtype), r.role, r.numel] for r in self.regions],
            "tensors": [[t.name, str(t.dtype), list(t.shape), t.region, t.offset, t.role] for t in self.tensors],
        }
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        """Bytes of all regions together."""
        return sum(r.nbytes for r in self.regions)

    def region_indices(self, role: str) -> list[int]:
        """Indices of the regions holding tensors of ``role``."""
        return [i for i, r in enumerate(self.regions) if r.role == role]

    def on_wire(self, float_dtype: torch.dtype) -> "Layout":
        """This layout as it travels when floats are sent as ``float_dtype`` (bf16, fp16).

        Same regions, tensors and offsets; floating regions change dtype (and so
        byte size); integer regions stay as they are. Its hash is not the model's
        identity: headers always name ``self.hash``.
        """
        if float_dtype == torch.float32 or not float_dtype.is_floating_point:
            return self

        def convert(dtype: torch.dtype) -> torch.dtype:
            return float_dtype if dtype.is_floating_point else dtype

        return Layout(
            tuple(dataclasses.replace(r, dtype=convert(r.dtype)) for r in self.regions),
            tuple(dataclasses.replace(t, dtype=convert(t.dtype)) for t in self.tensors),
        )

    # -- protobuf -----------------------------------------------------------------

    def to_proto(self) -> pb.Layout:
        """The wire form of this layout."""
        return pb.Layout(
            regions=[
                pb.RegionSpec(name=r.name, dtype=DTYPE_TO_WIRE[r.dtype], role=_ROLE_TO_WIRE[r.role], numel=r.numel)
                for r in self.regions
            ],
            tensors=[
                pb.TensorSpec(
                    name=t.name,
                    dtype=DTYPE_TO_WIRE[t.dtype],
                    shape=t.shape,
                    region=t.region,
                    offset=t.offset,
                    role=_ROLE_TO_WIRE[t.role],
                )
                for t in self.tensors
            ],
            hash=self.hash,
        )

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> "Layout":
        """Parses and checks a wire layout; raises LayoutError when inconsistent."""
        try:
            regions = tuple(
                Region(r.name, WIRE_TO_DTYPE[r.dtype], _WIRE_TO_ROLE[r.role], int(r.numel)) for r in msg.regions
            )
            tensors = tuple(
                TensorSlot(t.name, WIRE_TO_DTYPE[t.dtype], tuple(t.shape), t.region, t.offset, _WIRE_TO_ROLE[t.role])
                for t in msg.tensors
            )
        except KeyError as exc:
            raise LayoutError(f"unknown dtype or role in layout: {exc}") from None
        layout = cls(regions, tensors)
        rebuilt = cls.from_entries((t.name, t.dtype, t.shape, t.role) for t in tensors)
        if rebuilt != layout:
            raise LayoutError("layout offsets or regions are inconsistent")
        if msg.hash and msg.hash != layout.hash:
            raise LayoutError("layout hash does not match its contents")
        return layout

    # -- flat buffers <-> named tensors ---------------------------------------------

    def empty_regions(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> list[torch.Tensor]:
        """Fresh zero-filled flat buffers, one per region."""
        return [
            torch.zeros(r.numel, dtype=r.dtype, device=device, pin_memory=pin_memory and device == "cpu")
            for r in self.regions
        ]

    def views(self, regions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named tensors that are views into ``regions`` (writes go through)."""
        self.check_regions(regions)
        return {
            t.name: regions[t.region][t.offset : t.offset + t.numel].view(t.shape) for t in self.tensors
        }

    def flatten(self, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Copies a state_dict (or a subset matching this layout) into new regions."""
        regions = self.empty_regions(device)
        for t in self.tensors:
            if t.name not in state:
                raise LayoutError(f"state has no tensor {t.name!r}")
            value = state[t.name]
            if tuple(value.shape) != t.shape:
                raise LayoutError(f"{t.name}: shape {tuple(value.shape)} != layout {t.shape}")
            regions[t.region][t.offset : t.offset + t.numel].copy_(value.detach().reshape(-1))
        return regions

    def check_regions(self, regions: list[torch.Tensor]) -> None:
        """Raises LayoutError unless ``regions`` have this layout's sizes and dtypes."""
        if len(regions) != len(self.regions):
            raise LayoutError(f"expected {len(self.regions)} regions, got {len(regions)}")
        for spec, flat in zip(self.regions, regions):
            if flat.dtype != spec.dtype or flat.numel() != spec.numel or flat.dim() != 1:
                raise LayoutError(
                    f"region {spec.name}: expected {spec.numel} x {spec.dtype}, got {tuple(flat.shape)} x {flat.dtype}"
                )


def bind_model(model: nn.Module, layout: Layout, regions: list[torch.Tensor]) -> None:
    """Makes the model's laid-out parameters and buffers views into ``regions``.

    Afterwards, writing into the regions (a pull) updates the model in place, and
    the model's buffers (BatchNorm statistics) are read straight from the regions
    when pushing. Tensors outside the layout are left alone.
    """
    views = layout.views(regions)
    modules = dict(model.named_modules())
    for name, view in views.items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        current = getattr(module, attr)
        if tuple(current.shape) != tuple(view.shape) or current.dtype != view.dtype:
            raise LayoutError(f"{name}: model has {tuple(current.shape)} x {current.dtype}, layout {tuple(view.shape)}")
        view.copy_(current.detach().to(view.device))
        if isinstance(current, nn.Parameter):
            current.data = view
        else:
            module._buffers[attr] = view


def partition_names(names: list[str], sizes: list[int], index: int, count: int) -> list[str]:
    """The tensors of partition ``index`` of ``count``: a contiguous range of ``names``, balanced by bytes.

    Contiguous ranges keep every partition's share of each region a contiguous
    slice of the whole model's region, so a worker can pull each partition
    straight into a view of one set of buffers.

    Args:
        names: tensor names in state_dict order.
        sizes: their sizes in bytes.
        index, count: which partition, of how many.

    Raises:
        LayoutError: more partitions than tensors, or an index out of range.
    """
    if not 0 <= index < count:
        raise LayoutError(f"partition {index} is out of range for {count} partitions")
    if count > len(names):
        raise LayoutError(f"{len(names)} tensors cannot fill {count} partitions")
    total = sum(sizes)
    bounds, start, running = [], 0, 0
    for k in range(count - 1):
        # cut where the running size passes (k+1)/count of the total, leaving a tensor for every later partition
        end = start + 1
        running += sizes[start]
        while end < len(names) - (count - k - 1) and running + sizes[end] / 2 <= total * (k + 1) / count:
            running += sizes[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, len(names)))
    lo, hi = bounds[index]
    return names[lo:hi]
