"""Fine-tuning: start from a local torchvision state_dict, a new head, a frozen backbone."""

from __future__ import annotations


import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import fast_timeouts, train_in_threads
from paramhub.common.checkpoint import list_checkpoints, load_model_state
from paramhub.common.config import WorkerConfig
from paramhub.common.models import WeightsError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pretrained(tmp_path):
    """A 'pretrained' resnet18 with 10 classes, saved as safetensors (BN statistics made non-trivial)."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model.state_dict()


def run_workers(port: int, workers: int, tmp_path) -> None:
    config = WorkerConfig(server=f"127.0.0.1:{port}", data="synthetic", batch_size=4, image_size=32,
                          synthetic_size=64, log_every=0, timeouts=fast_timeouts())
    train_in_threads(config, workers)


def test_frozen_backbone_sends_only_the_head_and_keeps_the_backbone_exact(start_server, connect, pretrained, tmp_path):
    path, pretrained_state = pretrained
    server = start_server(model="resnet18", num_classes=3, init_from=str(path), new_head=True, freeze_backbone=True,
                          workers=2, max_steps=4, lr=0.05, checkpoint_dir=str(tmp_path / "ckpt"))
    info = connect(server.port).join("probe", observer=True)
    assert [t.name for t in info.layout.tensors] == ["fc.weight", "fc.bias"]
    assert info.layout.nbytes == (512 * 3 + 3) * 4  # bytes per push: the head only
    assert info.frozen_layout is not None and len(info.frozen_layout.tensors) == 120
    run_workers(server.port, 2, tmp_path)
    assert server.store.version == 4
    server.checkpoint()
    state = load_model_state(list_checkpoints(tmp_path / "ckpt")[-1])
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(state, strict=True)
    for name, tensor in pretrained_state.items():
        if not name.startswith("fc."):
            assert torch.equal(state[name], tensor), name  # backbone and its BN statistics untouched
    assert not torch.equal(state["fc.bias"], torch.zeros(3))


def test_full_fine_tuning_with_a_new_head_sends_everything(start_server, connect, pretrained):
    path, pretrained_state = pretrained
    server = start_server(model="resnet18", num_classes=3, init_from=str(path), new_head=True)
    client = connect(server.port)
    info = client.join("w")
    assert info.frozen_layout is None
    assert info.layout.nbytes > 40e6
    regions = info.layout.empty_regions()
    client.pull(regions)
    views = info.layout.views(regions)
    assert torch.equal(views["layer1.0.conv1.weight"], pretrained_state["layer1.0.conv1.weight"])
    assert views["fc.weight"].shape == (3, 512)


def test_bad_initial_weights_get_clear_errors(start_server, pretrained, tmp_path):
    path, _ = pretrained
    with pytest.raises(WeightsError, match="--new-head"):
        start_server(model="resnet18", num_classes=3, init_from=str(path))  # 10-class head into 3 classes
    with pytest.raises(WeightsError, match="does not match"):
        start_server(model="resnet34", num_classes=10, init_from=str(path))
    with pytest.raises(WeightsError, match="no weights file"):
        start_server(model="resnet18", num_classes=10, init_from=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        start_server(model="resnet18", num_classes=10, init_from=str(junk))
