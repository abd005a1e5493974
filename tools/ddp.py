"""Torch DDP on paramhub's own shards: the reference paramhub is measured against.

What a user would run instead of paramhub: ``DistributedDataParallel`` over gloo, one
process per worker, SGD on every rank. Rank r trains on exactly the samples, in
exactly the order, that paramhub's worker r would (``training_shard`` +
``shard_loader``), from initial weights read from a file, so a difference between
the two is a difference of the systems, never of the data.

Each rank is a process of its own (``python -m paramhub.tools.ddp RANK SPEC``), so
a CPU quota or a network namespace can be put on one rank alone. Ranks meet through
a file store (no port to pick). Rank 0 writes its model every ``save_every`` steps
(as a user would checkpoint DDP); with ``record_every_rank`` every rank writes its
own state after every step (the equivalence test averages their buffers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Iterator

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DDPSpec:
    """One DDP run: model, data, recipe and what to write.

    Args:
        init: a safetensors file with the initial state_dict (the same weights paramhub starts from).
        out: directory for what the ranks write (``steps.jsonl``, ``model-<step>.safetensors``, ``rank<r>/``).
        sampler: ``shards`` (rank r trains paramhub's shard r, in paramhub's order) or ``distributed``
            (what a DDP user writes: every shard pooled, dealt out anew each epoch by DistributedSampler).
        save_every: rank 0 writes its model every this many steps (0: only at the end).
        record_every_rank: every rank writes its full state after every step.
        broadcast_buffers: DDP's default (True) gives every rank rank 0's BatchNorm statistics.
        started: the wall-clock time (time.time()) the run counts from.
    """

    arch: str
    num_classes: int
    data: str
    image_size: int
    batch_size: int
    steps: int
    lr: float
    init: str
    out: str
    world_size: int = 2
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    augment: str = "auto"
    seed: int = 0
    synthetic_size: int = 4096
    threads: int = 1
    sampler: str = "shards"
    save_every: int = 0
    record_every_rank: bool = False
    broadcast_buffers: bool = True
    started: float = 0.0


def rank_batches(spec: DDPSpec, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The endless batches of one rank, as ``spec.sampler`` says."""
    from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

    from paramhub.common.data import seed_augmentation, shard_loader, training_shard
    from paramhub.worker.trainer import endless

    def shard(r: int):
        return training_shard(spec.data, r, spec.world_size, num_classes=spec.num_classes,
                              image_size=spec.image_size, augment=spec.augment, seed=spec.seed,
                              synthetic_size=spec.synthetic_size)

    seed_augmentation(spec.seed, rank)
    if spec.sampler == "shards":
        yield from endless(shard_loader(shard(rank), spec.batch_size, rank, spec.seed))
        return
    if spec.sampler != "distributed":
        raise ValueError(f"unknown sampler {spec.sampler!r}: shards or distributed")
    pooled = ConcatDataset([shard(r) for r in range(spec.world_size)])
    sampler = DistributedSampler(pooled, num_replicas=spec.world_size, rank=rank, shuffle=True, seed=spec.seed)
    loader = DataLoader(pooled, batch_size=spec.batch_size, sampler=sampler, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_rank(rank: int, spec: DDPSpec) -> None:
    """The body of one rank: join the group, train ``spec.steps`` steps, write what the spec asks."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.nn.parallel import DistributedDataParallel

    from paramhub.common.models import build_model

    torch.set_num_threads(spec.threads)
    out = pathlib.Path(spec.out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=spec.world_size)
    try:
        model = build_model(spec.arch, spec.num_classes)
        model.load_state_dict(load_file(spec.init))
        batches = rank_batches(spec, rank)
        ddp = DistributedDataParallel(model, broadcast_buffers=spec.broadcast_buffers)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay, nesterov=spec.nesterov)
        loss_fn = nn.CrossEntropyLoss()
        mine = out / f"rank{rank}"
        mine.mkdir(parents=True, exist_ok=True)
        log = open(out / "steps.jsonl", "a") if rank == 0 else None
        for step in range(1, spec.steps + 1):
            images, labels = next(batches)
            ddp.train()
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(ddp(images), labels)
            loss.backward()
            optimizer.step()
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            if spec.record_every_rank:
                save_file(state, mine / f"step-{step:06d}.safetensors")
            if rank == 0:
                if (spec.save_every and step % spec.save_every == 0) or step == spec.steps:
                    save_file(state, out / f"model-{step:06d}.safetensors")
                log.write(json.dumps({"step": step, "seconds": time.time() - spec.started,
                                      "loss": float(loss.detach()), "samples": len(labels) * spec.world_size})
                          + "\n")
                log.flush()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(spec: DDPSpec, env: dict[str, str] | None = None, prefix: dict[int, list[str]] | None = None,
           timeout: float = 600.0) -> None:
    """Runs every rank as a child process and waits for all of them (bounded).

    Args:
        env: extra environment for every rank.
        prefix: per rank, a command to run the rank under (``["ip", "netns", "exec", "ns1"]``).
        timeout: seconds for the whole run; past it every rank is killed.

    Raises:
        RuntimeError: a rank failed or the run timed out (its log is in ``spec.out``).
    """
    out = pathlib.Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rendezvous").unlink(missing_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    procs = []
    for rank in range(spec.world_size):
        argv = [*(prefix or {}).get(rank, []), sys.executable, "-m", "paramhub.tools.ddp", str(rank), str(spec_path)]
        with open(out / f"rank{rank}.log", "ab") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, **(env or {})}))
    deadline = time.monotonic() + timeout
    try:
        for rank, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code:
                raise RuntimeError(f"DDP rank {rank} exited {code}; see {out / f'rank{rank}.log'}")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"DDP run did not finish in {timeout:.0f}s; logs in {out}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str]) -> None:
    """One rank: ``python -m paramhub.tools.ddp RANK SPEC_JSON`` (``launch`` starts every rank so)."""
    rank, spec_path = int(argv[0]), argv[1]
    spec = DDPSpec(**json.loads(pathlib.Path(spec_path).read_text()))
    train_rank(rank, spec)


if __name__ == "__main__":
    main(sys.argv[1:])
