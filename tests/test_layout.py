"""common/layout.py: regions and offsets, the hash, the wire form, flat buffers <-> models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

from helpers_unit import random_regions, same_bytes
from paramhub.common.layout import BUFFER, PARAM, Layout, LayoutError, bind_model
from paramhub.common.models import build_model, head_names
from paramhub.common.pb import paramhub_pb2 as pb

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18", num_classes=10, seed=0)


@pytest.fixture(scope="module")
def resnet_layout(resnet):
    return Layout.from_model(resnet)


@pytest.fixture(scope="module")
def mlp():
    return build_model("mlp", num_classes=4, seed=0)


def check_contiguous(layout: Layout) -> None:
    """Every region is filled back to back, in state_dict order, with no gap and no overlap."""
    fill = [0] * len(layout.regions)
    for slot in layout.tensors:
        assert slot.offset == fill[slot.region], slot.name
        assert layout.regions[slot.region].dtype == slot.dtype
        assert layout.regions[slot.region].role == slot.role
        fill[slot.region] += slot.numel
    assert fill == [r.numel for r in layout.regions]


# -- from_model ---------------------------------------------------------------------------


def test_resnet18_regions(resnet, resnet_layout):
    layout = resnet_layout
    assert [(r.name, r.dtype, r.role) for r in layout.regions] == [
        ("param/float32", torch.float32, PARAM),
        ("buffer/float32", torch.float32, BUFFER),
        ("buffer/int64", torch.int64, BUFFER),
    ]
    state = resnet.state_dict()
    assert [t.name for t in layout.tensors] == list(state)  # state_dict order
    params = dict(resnet.named_parameters())
    assert layout.regions[0].numel == sum(p.numel() for p in params.values())
    for slot in layout.tensors:
        assert slot.shape == tuple(state[slot.name].shape)
        assert slot.dtype == state[slot.name].dtype
        assert slot.role == (PARAM if slot.name in params else BUFFER)
    bn_stats = [n for n in state if n.endswith(("running_mean", "running_var"))]
    counters = [n for n in state if n.endswith("num_batches_tracked")]
    assert layout.regions[1].numel == sum(state[n].numel() for n in bn_stats)
    assert layout.regions[2].numel == len(counters) == 20
    assert layout.nbytes == 4 * (layout.regions[0].numel + layout.regions[1].numel) + 8 * 20
    assert layout.region_indices(PARAM) == [0] and layout.region_indices(BUFFER) == [1, 2]
    check_contiguous(layout)


def test_mlp_has_one_param_region(mlp):
    layout = Layout.from_model(mlp)
    assert [(r.name, r.numel) for r in layout.regions] == [("param/float32", 48 * 64 + 64 + 64 * 4 + 4)]
    assert [(t.name, t.offset) for t in layout.tensors] == [
        ("hidden.weight", 0), ("hidden.bias", 3072), ("fc.weight", 3136), ("fc.bias", 3392)]
    check_contiguous(layout)


def test_subset_of_names(resnet):
    names = head_names(resnet)
    layout = Layout.from_model(resnet, names)
    assert [t.name for t in layout.tensors] == ["fc.weight", "fc.bias"]
    assert [(r.name, r.numel) for r in layout.regions] == [("param/float32", 512 * 10 + 10)]
    with pytest.raises(LayoutError, match="not_a_tensor"):
        Layout.from_model(resnet, ["fc.weight", "not_a_tensor"])


def test_from_entries_rejects_unsendable_dtype_and_unknown_role():
    with pytest.raises(LayoutError, match="float64"):
        Layout.from_entries([("x", torch.float64, (2,), PARAM)])
    with pytest.raises(LayoutError, match="role"):
        Layout.from_entries([("x", torch.float32, (2,), "optimizer")])


def test_mixed_dtypes_get_one_region_each_params_first():
    layout = Layout.from_entries([
        ("b16", torch.bfloat16, (2, 2), BUFFER),
        ("w", torch.float32, (3,), PARAM),
        ("h", torch.float16, (5,), PARAM),
        ("w2", torch.float32, (2,), PARAM),
        ("n", torch.int64, (), BUFFER),
    ])
    assert [r.name for r in layout.regions] == ["param/float16", "param/float32", "buffer/bfloat16", "buffer/int64"]
    assert [(t.name, t.region, t.offset) for t in layout.tensors] == [
        ("b16", 2, 0), ("w", 1, 0), ("h", 0, 0), ("w2", 1, 3), ("n", 3, 0)]
    check_contiguous(layout)


# -- hash ------------------------------------------------------------------------------------


def test_hash_is_stable(resnet_layout):
    other_weights = build_model("resnet18", num_classes=10, seed=123)
    assert Layout.from_model(other_weights).hash == resnet_layout.hash  # weights do not matter
    assert Layout.from_model(torchvision.models.resnet18(num_classes=10)).hash == resnet_layout.hash
    assert len(resnet_layout.hash) == 64 and int(resnet_layout.hash, 16) >= 0
    assert Layout.from_proto(resnet_layout.to_proto()).hash == resnet_layout.hash


def test_hash_changes_with_any_change(resnet, resnet_layout):
    base = Layout.from_entries([("a", torch.float32, (2, 3), PARAM), ("b", torch.float32, (4,), BUFFER)])
    slot = base.tensors[0]
    region = base.regions[0]
    variants = [
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, name="z"),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, dtype=torch.float16),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, shape=(3, 2)),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, offset=1),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, region=1),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=(dataclasses.replace(slot, role=BUFFER),) + base.tensors[1:]),
        dataclasses.replace(base, tensors=base.tensors[::-1]),
        dataclasses.replace(base, regions=(dataclasses.replace(region, numel=7),) + base.regions[1:]),
        dataclasses.replace(base, regions=(dataclasses.replace(region, name="x"),) + base.regions[1:]),
        Layout.from_entries([("a", torch.float32, (2, 3), PARAM)]),
    ]
    hashes = {v.hash for v in variants}
    assert base.hash not in hashes and len(hashes) == len(variants)
    assert Layout.from_model(build_model("resnet18", num_classes=11)).hash != resnet_layout.hash
    assert Layout.from_model(build_model("resnet34", num_classes=10)).hash != resnet_layout.hash
    assert Layout.from_model(resnet, head_names(resnet)).hash != resnet_layout.hash


# -- protobuf --------------------------------------------------------------------------------


def test_proto_round_trip(resnet_layout, mlp):
    for layout in (resnet_layout, Layout.from_model(mlp)):
        msg = layout.to_proto()
        assert msg.hash == layout.hash
        wire = pb.Layout.FromString(msg.SerializeToString())
        back = Layout.from_proto(wire)
        assert back == layout
        assert back.hash == layout.hash
    # A message without the hash is accepted (the hash is then computed, not checked).
    msg = resnet_layout.to_proto()
    msg.hash = ""
    assert Layout.from_proto(msg) == resnet_layout


def _mlp_proto(mlp) -> pb.Layout:
    return Layout.from_model(mlp).to_proto()


def test_from_proto_rejects_inconsistent_offsets(mlp):
    msg = _mlp_proto(mlp)
    msg.tensors[1].offset += 1
    msg.hash = ""
    with pytest.raises(LayoutError, match="inconsistent"):
        Layout.from_proto(msg)
    msg = _mlp_proto(mlp)
    msg.tensors[2].offset, msg.tensors[3].offset = msg.tensors[3].offset, msg.tensors[2].offset
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)


def test_from_proto_rejects_wrong_region_sizes_and_indices(mlp):
    msg = _mlp_proto(mlp)
    msg.regions[0].numel += 1
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)
    msg = _mlp_proto(mlp)
    msg.tensors[0].region = 1
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)
    msg = _mlp_proto(mlp)
    msg.regions[0].name = "param/float16"
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)
    msg = _mlp_proto(mlp)
    msg.tensors[0].shape[0] = 65  # the region is then too small
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)


def test_from_proto_rejects_wrong_hash(mlp):
    msg = _mlp_proto(mlp)
    msg.hash = "0" * 64
    with pytest.raises(LayoutError, match="hash"):
        Layout.from_proto(msg)
    # The right hash for different contents is wrong too.
    msg = _mlp_proto(mlp)
    msg.tensors[0].name = "renamed.weight"
    with pytest.raises(LayoutError, match="hash"):
        Layout.from_proto(msg)


@pytest.mark.parametrize("where", ["region", "tensor"])
@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_from_proto_rejects_unknown_dtype(mlp, where, dtype):
    msg = _mlp_proto(mlp)
    (msg.regions[0] if where == "region" else msg.tensors[0]).dtype = dtype
    with pytest.raises(LayoutError, match="dtype"):
        Layout.from_proto(msg)


def test_from_proto_rejects_unknown_role(mlp):
    msg = _mlp_proto(mlp)
    msg.tensors[0].role = pb.TENSOR_ROLE_UNSPECIFIED
    with pytest.raises(LayoutError):
        Layout.from_proto(msg)


def test_from_proto_rejects_negative_dimensions():
    # (-2, -2) has the same element count as (4,): only a shape check catches it.
    msg = Layout.from_entries([("a", torch.float32, (4,), PARAM)]).to_proto()
    msg.tensors[0].ClearField("shape")
    msg.tensors[0].shape.extend([-2, -2])
    msg.hash = ""
    with pytest.raises(LayoutError, match="negative"):
        Layout.from_proto(msg)


def test_from_proto_rejects_duplicate_names():
    layout = Layout.from_entries([("a", torch.float32, (2,), PARAM), ("b", torch.float32, (2,), PARAM)])
    msg = layout.to_proto()
    msg.tensors[1].name = "a"
    msg.hash = ""
    with pytest.raises(LayoutError, match="duplicate"):
        Layout.from_proto(msg)


# -- flat buffers <-> named tensors -------------------------------------------------------------


def test_flatten_then_views_equals_state_dict(resnet, resnet_layout):
    state = resnet.state_dict()
    regions = resnet_layout.flatten(state)
    resnet_layout.check_regions(regions)
    views = resnet_layout.views(regions)
    assert list(views) == list(state)
    for name, tensor in state.items():
        assert same_bytes(views[name], tensor), name
    # flatten copies: the regions do not alias the model.
    assert all(v.untyped_storage().data_ptr() != state[n].untyped_storage().data_ptr() for n, v in views.items())


def test_views_write_through(mlp):
    layout = Layout.from_model(mlp)
    regions = layout.empty_regions()
    views = layout.views(regions)
    views["fc.bias"].fill_(3.0)
    assert regions[0][3392:].tolist() == [3.0] * 4
    regions[0][:3072] = 1.5
    assert bool((views["hidden.weight"] == 1.5).all())
    assert layout.flatten(views)[0].equal(regions[0])


def test_flatten_rejects_missing_or_misshapen_tensors(mlp):
    layout = Layout.from_model(mlp)
    state = dict(mlp.state_dict())
    with pytest.raises(LayoutError, match="fc.bias"):
        layout.flatten({k: v for k, v in state.items() if k != "fc.bias"})
    state["fc.bias"] = torch.zeros(5)
    with pytest.raises(LayoutError, match="fc.bias"):
        layout.flatten(state)


def test_check_regions(mlp):
    layout = Layout.from_model(mlp)
    layout.check_regions(layout.empty_regions())
    for bad in ([], [torch.zeros(3396, dtype=torch.float16)], [torch.zeros(3395)], [torch.zeros(1, 3396)],
                [torch.zeros(3396), torch.zeros(1)]):
        with pytest.raises(LayoutError):
            layout.check_regions(bad)


# -- bind_model --------------------------------------------------------------------------------


def test_bind_model_regions_are_the_model(resnet_layout):
    model = build_model("resnet18", num_classes=10, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    regions = resnet_layout.empty_regions()
    bind_model(model, resnet_layout, regions)
    # Binding copies the model's current values into the regions.
    state = model.state_dict()
    assert all(same_bytes(state[k], before[k]) for k in before)
    assert same_bytes(regions[0], resnet_layout.flatten(before)[0])

    # Writes into the regions (a pull) show up in parameters and buffers.
    new = random_regions(resnet_layout, seed=7)
    new[2] = torch.arange(20, dtype=torch.int64)
    new[1] = new[1].abs() + 0.1  # running_var must stay positive
    for flat, src in zip(regions, new):
        flat.copy_(src)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = resnet_layout.views(new)
    for name, value in expected.items():
        actual = params[name] if name in params else buffers[name]
        assert same_bytes(actual.detach(), value), name
    assert isinstance(params["conv1.weight"], torch.nn.Parameter) and params["conv1.weight"].requires_grad
    assert int(buffers["bn1.num_batches_tracked"]) == expected["bn1.num_batches_tracked"].item()

    # The bound state_dict loads strictly into a fresh torchvision model.
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(model.state_dict(), strict=True)
    for name, value in fresh.state_dict().items():
        assert same_bytes(value, expected[name]), name
    fresh.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x))


def test_bound_model_writes_land_in_regions(resnet_layout):
    """Training the bound model (optimizer steps, BatchNorm statistics) updates the regions in place."""
    model = build_model("resnet18", num_classes=10, seed=2)
    regions = resnet_layout.empty_regions()
    bind_model(model, resnet_layout, regions)
    snapshot = [r.clone() for r in regions]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    opt.step()
    assert not regions[0].equal(snapshot[0])  # weights stepped in the region
    assert not regions[1].equal(snapshot[1])  # running statistics updated in the region
    assert bool((regions[2] == snapshot[2] + 1).all())  # every num_batches_tracked counted the batch
    views = resnet_layout.views(regions)
    for name, value in model.state_dict().items():
        assert same_bytes(value, views[name]), name


def test_bind_model_subset_leaves_the_rest_alone(resnet):
    model = build_model("resnet18", num_classes=10, seed=3)
    layout = Layout.from_model(model, head_names(model))
    conv = model.conv1.weight
    regions = layout.empty_regions()
    bind_model(model, layout, regions)
    regions[0].zero_()
    assert not model.fc.weight.any() and not model.fc.bias.any()
    assert model.conv1.weight is conv and conv.any()


def test_bind_model_rejects_a_model_of_another_shape(resnet_layout):
    with pytest.raises(LayoutError):
        bind_model(build_model("resnet18", num_classes=11), resnet_layout, resnet_layout.empty_regions())
    with pytest.raises(LayoutError):
        bind_model(build_model("resnet18", num_classes=10), resnet_layout, [torch.zeros(3)])
