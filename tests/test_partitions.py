"""Server partitions: each holds a contiguous range of the model; m = 1 and m = 3 train identically."""

from __future__ import annotations

import dataclasses


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import fast_timeouts, train_in_threads
from helpers_unit import property_settings
from paramhub.common.config import WorkerConfig
from paramhub.common.layout import Layout, LayoutError, partition_names
from paramhub.common.models import build_model
from paramhub.worker.client import PSClient, RunFailed
from paramhub.worker.partitions import PartitionedClient, RangeSlicer, combine_layouts

pytestmark = pytest.mark.timeout(180)


@property_settings(60)
@given(sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=30), data=st.data())
def test_partitions_are_contiguous_covering_and_non_empty(sizes, data):
    names = [f"t{i}" for i in range(len(sizes))]
    count = data.draw(st.integers(1, len(names)))
    parts = [partition_names(names, sizes, k, count) for k in range(count)]
    assert sum(parts, []) == names and all(parts)


def test_partitions_balance_resnet50_by_bytes():
    state = build_model("resnet50", 1000).state_dict()
    names, sizes = list(state), [t.numel() * t.element_size() for t in state.values()]
    shares = [sum(sizes[names.index(n)] for n in partition_names(names, sizes, k, 4)) for k in range(4)]
    assert max(shares) / min(shares) < 1.2
    with pytest.raises(LayoutError):
        partition_names(names[:2], sizes[:2], 0, 3)


def test_partition_slices_are_views_of_the_whole_model():
    model = build_model("resnet18", 10)
    state = model.state_dict()
    names, sizes = list(state), [t.numel() * t.element_size() for t in state.values()]
    layouts = [Layout.from_model(model, partition_names(names, sizes, k, 3)) for k in range(3)]
    combined, slices = combine_layouts(layouts)
    assert combined == Layout.from_model(model)
    regions = combined.flatten(state)
    for layout, part in zip(layouts, slices):
        views = layout.views(part.of(regions))
        assert all(torch.equal(views[n], state[n]) for n in views)
        assert part.of(regions)[0].untyped_storage().data_ptr() == regions[0].untyped_storage().data_ptr()


def train(start_server, partitions: int, steps: int = 5, **server_options) -> dict[str, torch.Tensor]:
    servers = [start_server(model="mlp", num_classes=4, workers=2, lr=0.1, momentum=0.9, max_steps=steps,
                            partition=(k, partitions), **server_options) for k in range(partitions)]
    config = WorkerConfig(data="synthetic", batch_size=8, image_size=8, synthetic_size=256, log_every=0,
                          device="cpu", timeouts=fast_timeouts())  # cpu: bit-identical runs need deterministic kernels

    def make_client():
        clients = [PSClient(f"127.0.0.1:{s.port}", config.timeouts) for s in reversed(servers)]  # any order
        return clients[0] if len(clients) == 1 else PartitionedClient(clients)

    train_in_threads(config, 2, make_client, timeout=120)
    state = {}
    for server in servers:
        assert server.store.version == steps
        state.update({k: v.clone() for k, v in server.layout.views(server.store.snapshot().regions).items()})
    return state


@pytest.mark.parametrize("compression", [{}, {"topk_ratio": 0.05}, {"topk_ratio": 0.05, "wire_dtype": "bf16"}],
                         ids=["dense", "topk", "topk-bf16"])
def test_one_and_three_partitions_give_identical_weights_in_sync_mode(start_server, compression):
    # Top-k picks over the whole model either way; each partition applies the picks in its slices.
    whole = train(start_server, 1, **compression)
    split = train(start_server, 3, **compression)
    assert set(whole) == set(split) == set(build_model("mlp", 4).state_dict())
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_partitions_with_different_topk_ratios_are_refused(start_server):
    a = start_server(model="mlp", num_classes=4, partition=(0, 2), topk_ratio=0.1)
    b = start_server(model="mlp", num_classes=4, partition=(1, 2))
    with PartitionedClient([PSClient(f"127.0.0.1:{s.port}", fast_timeouts()) for s in (a, b)]) as client:
        with pytest.raises(RunFailed, match="codecs"):
            client.join("w")


def test_addresses_that_are_not_one_model_s_partitions_are_refused(start_server):
    a = start_server(model="mlp", num_classes=4, partition=(0, 2))
    b = start_server(model="mlp", num_classes=4, partition=(0, 2))
    with PartitionedClient([PSClient(f"127.0.0.1:{s.port}", fast_timeouts()) for s in (a, b)]) as client:
        with pytest.raises(RunFailed, match="partitions 0/2, 0/2"):
            client.join("w")


def test_a_plain_pull_honours_min_version_on_every_partition_and_the_slicer_is_replaceable(start_server):
    """The evaluator's pull(min_version=v) must wait for v on each partition, not for the facade's own next."""
    timeouts = dataclasses.replace(fast_timeouts(), pull_wait=0.3)
    servers = [start_server(model="mlp", num_classes=4, partition=(k, 2), timeouts=timeouts) for k in range(2)]

    class Recording(RangeSlicer):
        splits = 0

        def split(self, regions):
            Recording.splits += 1
            return super().split(regions)

    clients = [PSClient(f"127.0.0.1:{s.port}", timeouts) for s in servers]
    with PartitionedClient(clients, slicer=Recording()) as client:
        info = client.join("reader", observer=True)
        regions = info.layout.empty_regions()
        assert client.pull(regions, min_version=0).version == 0  # at once: version 0 is there
        whole = {**servers[0].layout.views(servers[0].store.snapshot().regions),
                 **servers[1].layout.views(servers[1].store.snapshot().regions)}
        assert all(torch.equal(info.layout.views(regions)[n], whole[n]) for n in whole)
        for r in regions:
            r.fill_(7)
        assert client.pull(regions, min_version=1).version == 0  # the waits ended first: header only
        assert all(bool((r == 7).all()) for r in regions)  # nothing written
    assert Recording.splits == 2
