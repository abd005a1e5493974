"""GPU worker throughput, alone and while exchanging with a parameter server on the same machine.

The one script to run on a machine with a GPU::

    python -m paramhub.tools.gpu_bench                      # ResNet50, 224 px, batch 64, bf16, channels_last
    python -m paramhub.tools.gpu_bench --device cpu --model resnet18 --image-size 32 --batch-size 4 --steps 3

It measures training images/s of (a) the model alone, (b) the same loop as a
paramhub worker: after each step the gradients go device → pinned host memory
(asynchronously) and are pushed to a ps-server child process (async mode), and
the new weights are pulled back, and (c) the same worker with its transfers
overlapped with the next step (``OverlappedClient``, as ``ps-worker`` does on a GPU). Both use bf16 autocast and
channels_last
activations, synthetic data resident on the device, and a warm-up before timing.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import click
import torch
from torch import nn

from paramhub.common.config import Timeouts
from paramhub.common.layout import PARAM, Layout
from paramhub.common.models import build_model
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.worker.client import PSClient
from paramhub.worker.overlap import OverlappedClient


def _batch(batch_size: int, image_size: int, classes: int, device: torch.device):
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (batch_size,), device=device)


def _step(model: nn.Module, optimizer, images, labels, amp: bool) -> float:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = nn.functional.cross_entropy(model(images), labels)
    (optimizer or model).zero_grad(set_to_none=False)
    loss.backward()
    if optimizer:
        optimizer.step()
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alone(model_name, classes, image_size, batch_size, steps, warmup, device, amp) -> float:
    """Images/s of plain local training."""
    model = build_model(model_name, classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = _batch(batch_size, image_size, classes, device)
    for _ in range(warmup):
        _step(model, optimizer, images, labels, amp)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        _step(model, optimizer, images, labels, amp)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def with_server(model_name, classes, image_size, batch_size, steps, warmup, device, amp,
                overlap: bool = False) -> float:
    """Images/s when every step pushes its gradients to a local ps-server and pulls the new weights.

    With ``overlap`` the push and the pull run while the next step computes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        port_file = f"{tmp}/port"
        server = subprocess.Popen([sys.executable, "-m", "paramhub.ps.cli", "--port", "0", "--port-file", port_file,
                                   "--model", model_name, "--num-classes", str(classes), "--mode", "async",
                                   "--workers", "1", "--lr", "0.01"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(port_file):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException("ps-server did not start")
                time.sleep(0.1)
            with PSClient(f"127.0.0.1:{open(port_file).read().strip()}", Timeouts(connect=30)) as client:
                return _exchange_loop(client, model_name, classes, image_size, batch_size, steps, warmup, device, amp,
                                      overlap)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def _exchange_loop(client, model_name, classes, image_size, batch_size, steps, warmup, device, amp,
                   overlap: bool) -> float:
    info = client.join("gpu-bench")
    layout: Layout = info.layout
    if overlap:
        client = OverlappedClient(client, layout)  # unbounded async: the server has no --staleness
    model = build_model(model_name, classes).to(device).to(memory_format=torch.channels_last)
    state = model.state_dict()
    pinned = device.type == "cuda"
    host = layout.empty_regions(pin_memory=pinned)  # pulled weights and buffers
    grads = {r: torch.zeros_like(host[r]) for r in layout.region_indices(PARAM)}
    push = [grads.get(r, host[r]) for r in range(len(layout.regions))]
    params = dict(model.named_parameters())
    images, labels = _batch(batch_size, image_size, classes, device)
    version = info.version

    def one_step():
        nonlocal version
        header = client.wait_and_pull(host, version)
        with torch.no_grad():
            for name, view in layout.views(host).items():
                state[name].copy_(view, non_blocking=True)
        loss = _step(model, None, images, labels, amp)
        for slot in (t for t in layout.tensors if t.role == PARAM):
            grads[slot.region][slot.offset : slot.offset + slot.numel].copy_(
                params[slot.name].grad.reshape(-1), non_blocking=pinned)
        _sync(device)
        reply = client.push(pb.PUSH_KIND_GRADIENT, header.version, push, num_samples=batch_size, loss=loss)
        version = reply.next_version

    for _ in range(warmup):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return steps * batch_size / (time.perf_counter() - start)


@click.command()
@click.option("--model", "model_name", default="resnet50", show_default=True)
@click.option("--classes", default=1000, show_default=True)
@click.option("--image-size", default=224, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast.")
def main(model_name, classes, image_size, batch_size, steps, warmup, device, amp):
    """Images/s of a training loop alone and as a paramhub worker (JSON)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here; pass --device cpu for a smoke run")
    args = (model_name, classes, image_size, batch_size, steps, warmup, device, amp)
    result = {"model": model_name, "image_size": image_size, "batch_size": batch_size, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "amp_bf16": amp,
              "channels_last": True, "alone_images_per_s": alone(*args), "with_server_images_per_s": with_server(*args),
              "overlapped_images_per_s": with_server(*args, overlap=True)}
    result["ratio"] = result["with_server_images_per_s"] / result["alone_images_per_s"]
    result["overlapped_ratio"] = result["overlapped_images_per_s"] / result["alone_images_per_s"]
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
