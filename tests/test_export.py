"""ps-ctl export: checkpoints (server's and ps-eval's) to plain state_dicts that torchvision loads strictly."""

from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file

from paramhub.common.checkpoint import STATE_PREFIX, save_checkpoint, save_state_file
from paramhub.common.models import build_model
from paramhub.tools.ctl import main

pytestmark = pytest.mark.timeout(120)


def trained_resnet18(seed: int) -> torch.nn.Module:
    """A resnet18 with non-default weights and BatchNorm statistics, as a server would hold after training."""
    model = build_model("resnet18", 5, seed=seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))  # moves running stats
    return model.eval()


def server_checkpoint(directory, version: int, model: torch.nn.Module):
    momentum = {"rule.param/float32.momentum_buffer": torch.ones(3)}
    return save_checkpoint(directory, version, model.state_dict(), momentum,
                           metadata={"model": "resnet18", "num_classes": 5, "layout_hash": "x"}, keep_last=0)


def export(checkpoint, out):
    return CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_strictly_into_torchvision_and_gives_the_same_outputs(tmp_path, suffix):
    model = trained_resnet18(seed=1)
    ckpt = server_checkpoint(tmp_path / "ckpt", 7, model)
    result = export(ckpt, tmp_path / f"model{suffix}")
    assert result.exit_code == 0, result.output
    assert "resnet18" in result.output and "version 7" in result.output

    path = tmp_path / f"model{suffix}"
    state = torch.load(path, map_location="cpu", weights_only=True) if suffix == ".pt" else load_file(path)
    assert not any(key.startswith(STATE_PREFIX) for key in state)
    exported = torchvision.models.get_model("resnet18", num_classes=5)
    exported.load_state_dict(state, strict=True)
    assert torch.equal(outputs(exported), outputs(model))


def test_a_directory_exports_its_newest_checkpoint(tmp_path):
    server_checkpoint(tmp_path / "ckpt", 3, trained_resnet18(seed=1))
    newest = trained_resnet18(seed=2)
    server_checkpoint(tmp_path / "ckpt", 12, newest)
    result = export(tmp_path / "ckpt", tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    assert "ckpt-v000000012" in result.output
    exported = torchvision.models.resnet18(num_classes=5)
    exported.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert torch.equal(outputs(exported), outputs(newest))


def test_ps_eval_best_model_exports_too(tmp_path):
    model = build_model("mlp", 3, seed=4)
    save_state_file(tmp_path / "best" / "best.safetensors", model.state_dict(),
                    {"version": 9, "model": "mlp", "num_classes": 3, "top1": 0.5})
    result = export(tmp_path / "best" / "best.safetensors", tmp_path / "mlp.safetensors")
    assert result.exit_code == 0, result.output
    assert "build_model('mlp', 3)" in result.output
    exported = build_model("mlp", 3, seed=0)
    exported.load_state_dict(load_file(tmp_path / "mlp.safetensors"), strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(exported(x), model(x))


def test_errors_are_clear_and_write_nothing(tmp_path):
    ckpt = server_checkpoint(tmp_path / "ckpt", 1, build_model("resnet18", 5))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json and not tensors")
    unnamed = save_state_file(tmp_path / "plain.safetensors", {"w": torch.ones(2)})
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "missing.safetensors", "model.pt", 1, "no checkpoint at"),
        (corrupt, "model.pt", 1, "cannot read checkpoint"),
        (tmp_path / "empty", "model.pt", 1, "no checkpoints"),
        (unnamed, "model.pt", 1, "does not say which model"),
        (ckpt, "model.bin", 2, "must end in .pt or .safetensors"),
    ]
    for source, out, code, message in cases:
        result = export(source, tmp_path / out)
        assert result.exit_code == code and message in result.output, (source, result.output)
        assert not (tmp_path / out).exists()


def test_a_checkpoint_that_does_not_fit_its_model_is_refused(tmp_path):
    state = build_model("resnet18", 5).state_dict()
    del state["fc.bias"]
    save_checkpoint(tmp_path, 1, state, metadata={"model": "resnet18", "num_classes": 5})
    result = export(tmp_path, tmp_path / "model.pt")
    assert result.exit_code == 1 and "does not fit resnet18 with 5 classes" in result.output
    assert "fc.bias" in result.output and not (tmp_path / "model.pt").exists()


def export_precise(checkpoint, out, data, *extra):
    return CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--out", str(out),
                                     "--precise-bn-data", str(data), "--precise-bn-batches", "3", "--batch-size", "4",
                                     "--image-size", "16", *extra])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_precise_bn_export_changes_the_batchnorm_buffers_only_and_loads_strictly(tmp_path, suffix):
    from test_precise_bn import write_image_folder

    from paramhub.common.evaluation import PreciseBN

    write_image_folder(tmp_path / "train", classes=5, per_class=4)
    model = trained_resnet18(seed=3)
    ckpt = server_checkpoint(tmp_path / "ckpt", 8, model)
    path = tmp_path / f"model{suffix}"
    result = export_precise(ckpt, path, tmp_path / "train")
    assert result.exit_code == 0, result.output
    assert "BatchNorm statistics of 20 layers recomputed on 3 batches (12 images)" in result.output

    state = torch.load(path, map_location="cpu", weights_only=True) if suffix == ".pt" else load_file(path)
    exported = torchvision.models.resnet18(num_classes=5)
    exported.load_state_dict(state, strict=True)
    original = model.state_dict()
    bn_buffers = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(state) == set(original) and len(bn_buffers) == 60
    for name, tensor in state.items():
        if name in bn_buffers:
            assert not torch.equal(tensor, original[name]), f"{name} was not recomputed"
        else:
            assert torch.equal(tensor, original[name]), f"{name} changed"  # the weights, bit for bit
    assert state["bn1.num_batches_tracked"].item() == 3
    reference = trained_resnet18(seed=3)  # recomputed independently of the export
    PreciseBN(tmp_path / "train", num_classes=5, image_size=16, batch_size=4, num_batches=3).apply(reference, "cpu")
    for name in bn_buffers:
        torch.testing.assert_close(state[name], reference.state_dict()[name], rtol=1e-6, atol=1e-7)
    if suffix == ".safetensors":
        from paramhub.common.checkpoint import load_checkpoint

        meta = load_checkpoint(path)[2]
        assert meta["precise_bn"]["batches"] == 3 and meta["precise_bn"]["image_size"] == 16


def test_precise_bn_export_leaves_the_frozen_layers_of_a_best_model_alone_and_mlp_as_it_is(tmp_path):
    from test_precise_bn import write_image_folder

    write_image_folder(tmp_path / "train", classes=5, per_class=4)
    model = trained_resnet18(seed=4)
    frozen = ["bn1", "layer1.0.bn1"]
    save_state_file(tmp_path / "best.safetensors", model.state_dict(),
                    {"version": 2, "model": "resnet18", "num_classes": 5, "frozen_batchnorm": frozen})
    result = export_precise(tmp_path / "best.safetensors", tmp_path / "model.pt", tmp_path / "train")
    assert result.exit_code == 0 and "18 layers recomputed" in result.output and "2 frozen" in result.output
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    for name in ("bn1.running_var", "layer1.0.bn1.running_mean", "layer1.0.bn1.num_batches_tracked"):
        assert torch.equal(state[name], model.state_dict()[name]), name
    assert not torch.equal(state["layer1.0.bn2.running_var"], model.state_dict()["layer1.0.bn2.running_var"])

    mlp = build_model("mlp", 5, seed=1)
    save_state_file(tmp_path / "mlp.safetensors", mlp.state_dict(), {"version": 1, "model": "mlp", "num_classes": 5})
    result = export_precise(tmp_path / "mlp.safetensors", tmp_path / "mlp.pt", tmp_path / "train")
    assert result.exit_code == 0 and "no BatchNorm statistics to recompute" in result.output
    state = torch.load(tmp_path / "mlp.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())


def test_bad_precise_bn_data_is_refused_and_nothing_is_written(tmp_path):
    from test_precise_bn import write_image_folder

    ckpt = server_checkpoint(tmp_path / "ckpt", 1, build_model("resnet18", 5))
    write_image_folder(tmp_path / "three", classes=3, per_class=2)
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "not an ImageFolder"),
             (tmp_path / "three", "has 3 classes but the model has 5")]
    for data, message in cases:
        result = export_precise(ckpt, tmp_path / "model.pt", data)
        assert result.exit_code == 2 and message in result.output and "--precise-bn-data" in result.output, \
            result.output
        assert not (tmp_path / "model.pt").exists()
