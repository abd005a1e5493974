"""``ps-bench convergence``: every mode on the same data, against single-process training.

Each mode runs as real processes (one ps-server, N ps-workers) on synthetic data;
the server checkpoints every few versions and the checkpoints are evaluated
afterwards on held-out samples, so evaluation never slows the run it measures.
Wall time of a checkpoint is its file's modification time since the server
started. The baseline trains the same model from the same initial weights in one
process with SGD at the same total batch (N × batch).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from paramhub.common.checkpoint import list_checkpoints, load_model_state
from paramhub.common.models import build_model
from paramhub.tools.cluster import LocalCluster

MODES = {
    "sync-grad": ["--mode", "sync", "--update", "grad"],
    "async-grad": ["--mode", "async", "--update", "grad", "--staleness", "4"],
    "sync-avg": ["--mode", "sync", "--update", "avg", "--local-steps", "4"],
    "async-avg": ["--mode", "async", "--update", "avg", "--local-steps", "4", "--staleness", "4"],
    "sync-diloco": ["--mode", "sync", "--update", "avg", "--local-steps", "4", "--outer-optimizer", "nesterov"],
}
# The same server as another mode, with these worker flags (CPU workers do not overlap by default).
WORKER_VARIANTS = {
    "async-grad-overlap": ("async-grad", ["--overlap"]),
    "async-avg-overlap": ("async-avg", ["--overlap"]),
}
RUNS = [*MODES, *WORKER_VARIANTS]  # what --modes accepts; the default runs MODES


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark's shared settings."""

    model: str = "resnet18"
    classes: int = 10
    image_size: int = 32
    workers: int = 4
    batch_size: int = 16
    updates: int = 40
    eval_every: int = 5
    lr: float = 0.02
    synthetic_size: int = 4096
    eval_size: int = 512


def held_out(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Unseen synthetic samples of the same classes (a disjoint noise seed range)."""
    # common.data imports torchvision: imported where used, so that ps-bench (which imports this module)
    # and its server child (tools/bench_servers.py) run without torchvision, as ps-server does
    from paramhub.common.data import SyntheticImages

    data = SyntheticImages(settings.eval_size, settings.classes, settings.image_size, index_offset=10_000_000)
    images = torch.stack([data[i][0] for i in range(len(data))])
    return images, torch.tensor([data[i][1] for i in range(len(data))])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def run_mode(name: str, settings: Settings, workdir: pathlib.Path, images, labels) -> list[dict]:
    """Trains with one mode; returns [{version, seconds, top1}] for each checkpoint."""
    server_mode, worker_flags = WORKER_VARIANTS.get(name, (name, []))
    ckpt = workdir / name / "ckpt"
    with LocalCluster(workdir / name) as cluster:
        started = time.time()
        cluster.start_server("--model", settings.model, "--num-classes", str(settings.classes),
                             "--workers", str(settings.workers), "--max-steps", str(settings.updates),
                             "--lr", str(settings.lr), "--local-lr", str(settings.lr), "--checkpoint-dir", str(ckpt),
                             "--checkpoint-every", str(settings.eval_every), "--keep-checkpoints", "1000",
                             *MODES[server_mode])
        for shard in range(settings.workers):
            cluster.start_worker(shard, "--image-size", str(settings.image_size), "--batch-size",
                                 str(settings.batch_size), "--synthetic-size", str(settings.synthetic_size),
                                 "--log-every", "0", *worker_flags)
        codes = cluster.wait(timeout=3600)
        if any(codes.values()):
            raise RuntimeError(f"{name}: processes failed {codes}; logs in {cluster.workdir}")
    rows = []
    model = build_model(settings.model, settings.classes)
    for path in list_checkpoints(ckpt):
        model.load_state_dict(load_model_state(path))
        rows.append({"version": int(path.name[6:15]), "seconds": path.stat().st_mtime - started,
                     "top1": accuracy(model, images, labels)})
    return rows


def run_baseline(settings: Settings, images, labels) -> list[dict]:
    """Single-process SGD (momentum 0.9) at the same total batch, from the same initial weights."""
    from paramhub.common.data import SyntheticImages  # see held_out

    model = build_model(settings.model, settings.classes)
    data = SyntheticImages(settings.synthetic_size, settings.classes, settings.image_size)
    loader = DataLoader(Subset(data, range(len(data))), batch_size=settings.workers * settings.batch_size,
                        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9)
    rows, step, started = [], 0, time.time()
    while step < settings.updates:
        for x, y in loader:
            model.train()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            if step % settings.eval_every == 0:
                seconds = time.time() - started
                rows.append({"version": step, "seconds": seconds, "top1": accuracy(model, images, labels)})
            if step >= settings.updates:
                break
    return rows


def run(settings: Settings, modes: list[str], workdir: str | None = None) -> dict:
    """Runs the baseline and every mode; returns {name: rows}."""
    work = pathlib.Path(workdir or tempfile.mkdtemp(prefix="paramhub-convergence-"))
    images, labels = held_out(settings)
    results = {"single-process": run_baseline(settings, images, labels)}
    for name in modes:
        results[name] = run_mode(name, settings, work, images, labels)
    return results


def format_table(results: dict) -> str:
    """Top-1 and wall seconds per evaluated version, one column pair per run."""
    names = list(results)
    versions = sorted({row["version"] for rows in results.values() for row in rows})
    by_name = {name: {row["version"]: row for row in rows} for name, rows in results.items()}
    header = f"{'version':>7} " + " ".join(f"{name:>22}" for name in names)
    lines = [header, f"{'':>7} " + " ".join(f"{'top1':>10} {'wall s':>11}" for _ in names)]
    for v in versions:
        cells = []
        for name in names:
            row = by_name[name].get(v)
            cells.append(f"{row['top1']:>10.3f} {row['seconds']:>11.1f}" if row else f"{'-':>10} {'-':>11}")
        lines.append(f"{v:>7} " + " ".join(cells))
    return "\n".join(lines)


def to_json(results: dict, settings: Settings) -> str:
    """The results and settings as one JSON document."""
    return json.dumps({"settings": dataclasses.asdict(settings), "results": results}, indent=2)
