"""common/checkpoint.py: atomic safetensors checkpoints, pruning, torchvision-loadable model state."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from helpers_unit import same_bytes
from paramhub.common import checkpoint
from paramhub.common.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint
from paramhub.common.layout import Layout
from paramhub.common.models import build_model

pytestmark = pytest.mark.timeout(60)


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3, 4, generator=gen),
        "a.bias": torch.randn(4, generator=gen).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def test_round_trip(tmp_path):
    model_state = small_state()
    server_state = {"rule.param/float32.momentum_buffer": torch.arange(6, dtype=torch.float32)}
    meta = {"model": "mlp", "num_classes": 4, "layout_hash": "ab" * 32, "nested": {"x": [1, 2.5, None]}}
    path = checkpoint.save_checkpoint(tmp_path, 12, model_state, server_state, metadata=meta)
    assert path == checkpoint_path(tmp_path, 12) == tmp_path / "ckpt-v000000012.safetensors"
    model, server, metadata = load_checkpoint(path)
    assert set(model) == set(model_state)
    assert all(same_bytes(model[k], v) for k, v in model_state.items())
    assert set(server) == set(server_state)
    assert same_bytes(server["rule.param/float32.momentum_buffer"], server_state["rule.param/float32.momentum_buffer"])
    assert metadata == {**meta, "version": 12}


def test_without_server_state_or_metadata(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "new" / "dir", 0, small_state())
    model, server, metadata = load_checkpoint(path)
    assert server == {} and metadata == {"version": 0}
    assert set(model) == set(small_state())


def test_the_file_is_plain_safetensors_without_pickle(tmp_path):
    from safetensors.torch import load_file

    path = checkpoint.save_checkpoint(tmp_path, 1, small_state(), {"x": torch.ones(2)})
    raw = load_file(path)
    assert set(raw) == set(small_state()) | {checkpoint.STATE_PREFIX + "x"}
    # safetensors: an 8-byte little-endian header length, then a JSON header; no zip, no pickle.
    blob = path.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    assert blob[8:9] == b"{" and 8 + header_len < len(blob)


def test_saving_views_of_flat_regions(tmp_path):
    """The server saves views into its flat regions; values, not aliases, are written."""
    model = build_model("resnet18", num_classes=10)
    layout = Layout.from_model(model)
    regions = layout.flatten(model.state_dict())
    path = checkpoint.save_checkpoint(tmp_path, 3, layout.views(regions))
    loaded = checkpoint.load_model_state(path)
    for name, value in model.state_dict().items():
        assert same_bytes(loaded[name], value), name
    regions[0].zero_()  # the checkpoint does not change with the live buffer
    assert same_bytes(checkpoint.load_model_state(path)["conv1.weight"], model.state_dict()["conv1.weight"])


def test_model_state_loads_strict_into_torchvision(tmp_path):
    model = build_model("resnet18", num_classes=10, seed=5)
    with torch.no_grad():
        model.bn1.running_mean.add_(1.0)
        model.bn1.num_batches_tracked.fill_(9)
    server_state = {"rule.param/float32.momentum_buffer": torch.zeros(4)}
    path = checkpoint.save_checkpoint(tmp_path, 4, model.state_dict(), server_state)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(checkpoint.load_model_state(path), strict=True)
    for name, value in model.state_dict().items():
        assert same_bytes(fresh.state_dict()[name], value), name


def test_atomic_no_temporary_files_left(tmp_path):
    for version in (1, 2):
        checkpoint.save_checkpoint(tmp_path, version, small_state(version), keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-v000000001.safetensors", "ckpt-v000000002.safetensors"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch, failing):
    good = checkpoint.save_checkpoint(tmp_path, 5, small_state(0))
    good_bytes = good.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 5, small_state(1))  # same version: would overwrite
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 6, small_state(1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no temp file, no partial new checkpoint
    assert good.read_bytes() == good_bytes


def test_keep_last_prunes_oldest(tmp_path):
    for version in (3, 1, 10, 2, 7):
        checkpoint.save_checkpoint(tmp_path, version, small_state(), keep_last=100)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_path(tmp_path, v).name for v in (1, 2, 3, 7, 10)]
    checkpoint.save_checkpoint(tmp_path, 11, small_state(), keep_last=2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 10), checkpoint_path(tmp_path, 11)]
    checkpoint.save_checkpoint(tmp_path, 12, small_state(), keep_last=0)  # 0 keeps all
    assert len(list_checkpoints(tmp_path)) == 3


def test_pruning_leaves_other_files_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "ckpt-v1.safetensors").write_text("not our name pattern")
    for version in range(4):
        checkpoint.save_checkpoint(tmp_path, version, small_state(), keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-v000000003.safetensors", "ckpt-v1.safetensors",
                                                           "notes.txt"]


def test_list_checkpoints_of_missing_directory(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "ckpt-v000000001.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        checkpoint.load_model_state(tmp_path)  # a directory is not a checkpoint


@pytest.mark.parametrize("damage", ["truncate-body", "truncate-header", "garbage", "empty"])
def test_corrupt_checkpoint(tmp_path, damage):
    path = checkpoint.save_checkpoint(tmp_path, 2, small_state())
    data = path.read_bytes()
    if damage == "truncate-body":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "truncate-header":
        path.write_bytes(data[:20])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 50)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_the_optimizer_state_schema_round_trips_and_ignores_other_tensors():
    from paramhub.common.checkpoint import rule_state_of, rule_state_tensors

    names = ["param/float32", "buffer/float32"]
    state = {0: {"momentum_buffer": torch.ones(3), "step": torch.tensor(4)}}
    tensors = rule_state_tensors(names, state)
    assert sorted(tensors) == ["rule.param/float32.momentum_buffer", "rule.param/float32.step"]
    tensors["ledger.rows"] = torch.zeros(2)  # the ledger's own tensors sit beside them
    tensors["rule.gone/float16.momentum_buffer"] = torch.zeros(1)  # a region this layout does not have
    back = rule_state_of(names, tensors)
    assert list(back) == [0] and sorted(back[0]) == ["momentum_buffer", "step"]
    assert torch.equal(back[0]["momentum_buffer"], state[0]["momentum_buffer"])
