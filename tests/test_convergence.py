"""Every mode × update trains a small learnable task to a low held-out loss in a bounded number of updates.

A wiring check of every combination, not a measure of accuracy: a real in-process
server and real Trainers (one thread each), the mlp model on synthetic 8 px images
that are easy to separate. The convergence test that can fail — real images, a
threshold from DDP, DDP's own trajectory and broken servers that must fail it — is
tests/test_convergence_digits.py.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import fast_timeouts, train_in_threads
from paramhub.common.config import WorkerConfig
from paramhub.common.data import SyntheticImages
from paramhub.common.models import build_model

pytestmark = pytest.mark.timeout(180)
CLASSES, IMAGE = 4, 8


def evaluate(server) -> tuple[float, float]:
    """(loss, accuracy) of the server's current model on 512 unseen synthetic samples."""
    model = build_model("mlp", CLASSES)
    model.load_state_dict(server.layout.views(server.store.snapshot().regions))
    data = SyntheticImages(512, CLASSES, IMAGE, seed=0, index_offset=10_000_000)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = model(images)
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def train(start_server, workers: int, **server_options):
    server = start_server(model="mlp", num_classes=CLASSES, workers=workers, **server_options)
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", batch_size=16, image_size=IMAGE,
                          synthetic_size=2048, log_every=0, timeouts=fast_timeouts())
    summaries = train_in_threads(config, workers)
    return server, summaries


@pytest.mark.parametrize("options", [
    dict(mode="sync", update="grad", lr=0.1, momentum=0.9),
    dict(mode="async", update="grad", lr=0.1, momentum=0.9, staleness=2),  # the sync recipe: the server scales it
    dict(mode="sync", update="avg", local_steps=4, local_lr=0.05),
    dict(mode="async", update="avg", local_steps=4, local_lr=0.05, staleness=2),
    dict(mode="sync", update="avg", local_steps=4, local_lr=0.05, outer_optimizer="nesterov"),
    dict(mode="sync", update="grad", optimizer="adamw", lr=0.01, lr_schedule="cosine", warmup_versions=5),
    dict(mode="sync", update="grad", lr=0.1, momentum=0.9, wire_dtype="bf16"),
    dict(mode="async", update="avg", local_steps=4, local_lr=0.05, staleness=2, wire_dtype="fp16"),
    dict(mode="sync", update="grad", lr=0.1, momentum=0.9, topk_ratio=0.05),
    dict(mode="async", update="grad", lr=0.1, momentum=0.9, codec="int8"),
    dict(mode="sync", update="avg", local_steps=4, local_lr=0.05, outer_optimizer="nesterov",
         codec="topk2bit:ratio=0.05"),
], ids=["sync-grad", "async-grad", "sync-avg", "async-avg", "sync-diloco", "sync-adamw-cosine", "sync-grad-bf16",
        "async-avg-fp16", "sync-grad-topk5%", "async-grad-int8", "sync-diloco-topk2bit5%"])
def test_each_mode_and_update_converges(start_server, options):
    updates = 25 if options["update"] == "grad" else 10
    loss_before, _ = evaluate(start_server(model="mlp", num_classes=CLASSES))
    server, summaries = train(start_server, workers=3, max_steps=updates, **options)
    loss, accuracy = evaluate(server)
    assert server.store.version == updates
    assert loss < 0.35 and accuracy > 0.9, (loss_before, loss, accuracy)
    assert server.engine.ledger.total >= updates
    if options.get("staleness") is not None:
        assert max(server.engine.ledger.staleness_histogram, default=0) <= options["staleness"]
