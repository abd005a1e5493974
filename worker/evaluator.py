"""The evaluator: an observer that scores the global model as the run goes.

join as an observer (not counted as a worker, never pushes) → build the model the
server names → loop { pull the newest version; evaluate it (with ``--precise-bn-data``:
also after recomputing its BatchNorm statistics on training images, which is then the
score that counts); append the metrics to a JSONL file; keep the best model so far }
until the run is done (or once).
A background watcher fetches the final version the moment the run is done, since
the server exits soon after and an evaluation in progress may take longer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading
import time

import torch
from torch.utils.data import DataLoader

from paramhub.common.config import Timeouts
from paramhub.common.evaluation import (BEST_MODEL, PRECISE_BN_BATCHES, BestModel, PreciseBN, evaluate,
                                        evaluate_precise, evaluation_dataset, frozen_batchnorm_names)
from paramhub.common.layout import Layout, bind_model
from paramhub.common.models import build_model
from paramhub.worker.client import JoinInfo, RunFailed, ServerRestarted
from paramhub.worker.interface import ParameterClient
from paramhub.worker.trainer import check_layout, load_frozen, resolve_device

log = logging.getLogger("paramhub.worker")

WAIT_SLICE_S = 0.25  # how often waits look at the stop event
NEVER = 2**63 - 1  # a version no run reaches: a Pull for it returns only when the run is done


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything ``ps-eval`` needs.

    ``every`` None means evaluate once; otherwise at most once per ``every`` seconds.
    """

    server: str = "127.0.0.1:50051"
    data: str = "synthetic"
    image_size: int = 224
    every: float | None = 60.0
    out: str | None = None
    checkpoint_dir: str | None = None
    batch_size: int = 64
    device: str = "auto"
    eval_size: int = 1024
    seed: int = 0
    loader_workers: int = 0
    name: str = ""
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    tensorboard: str | None = None  # a directory for TensorBoard scalars (needs the tensorboard package)
    # precise BN: recompute BatchNorm statistics on these training images (batch_size each) before scoring
    precise_bn_data: str | None = None
    precise_bn_batches: int = PRECISE_BN_BATCHES


class Evaluator:
    """Evaluates the global model of one parameter server.

    Args:
        config: the evaluator's settings.
        client: a connected, not yet joined ParameterClient.
        stop: set it to end the loop after the current step (SIGTERM, tests).
    """

    def __init__(self, config: EvalConfig, client: ParameterClient, stop: threading.Event | None = None):
        self.config = config
        self.client = client
        self.stop = stop or threading.Event()
        self.records: list[dict] = []
        self.board = None  # a SummaryWriter while run() runs with config.tensorboard

    def _join(self) -> JoinInfo:
        return self.client.join(name=self.config.name, observer=True)

    def run(self) -> list[dict]:
        """Evaluates until the run is done (or once, or until ``stop``); returns the records written.

        Raises:
            ServerUnreachable: the server did not answer for ``timeouts.connect`` seconds.
            RunFailed: the server's model differs from ours, or it changed on a restart.
            DataError: the evaluation data cannot be used.
        """
        cfg = self.config
        info = self._join()
        model = build_model(info.model.arch, info.model.num_classes)
        layout = info.layout
        check_layout(model, layout, info.model.arch)
        device = resolve_device(cfg.device)
        model.to(device)
        if info.frozen_layout is not None:
            self._load_frozen(model, info)
        # Pulls write into CPU buffers; on the CPU the model's tensors are views into them.
        wire_regions = layout.empty_regions()
        model_regions = layout.empty_regions(device) if device.type == "cuda" else wire_regions
        bind_model(model, layout, model_regions)

        data = evaluation_dataset(cfg.data, num_classes=info.model.num_classes, image_size=cfg.image_size,
                                  size=cfg.eval_size, seed=cfg.seed)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.loader_workers,
                            pin_memory=device.type == "cuda")
        facts = {"model": info.model.arch, "num_classes": info.model.num_classes, "layout_hash": layout.hash}
        # A frozen backbone keeps its (pretrained) BatchNorm statistics: the head was trained against them.
        frozen_bn = (frozen_batchnorm_names(model, {t.name for t in info.frozen_layout.tensors})
                     if info.frozen_layout is not None else set())
        if frozen_bn:
            facts["frozen_batchnorm"] = sorted(frozen_bn)  # ps-ctl export --precise-bn-data leaves them alone too
        precise = None
        if cfg.precise_bn_data:
            precise = PreciseBN(cfg.precise_bn_data, num_classes=info.model.num_classes, image_size=cfg.image_size,
                                batch_size=cfg.batch_size, num_batches=cfg.precise_bn_batches,
                                loader_workers=cfg.loader_workers, pin_memory=device.type == "cuda")
        best = BestModel(cfg.checkpoint_dir, facts) if cfg.checkpoint_dir else None
        log.info("[eval] joined %s as observer %d: %s, %d classes, %d samples from %s, device %s",
                 cfg.server, info.worker_id, info.model.arch, info.model.num_classes, len(data), cfg.data, device)
        if precise is not None:
            log.info("[eval] precise BN: each version's BatchNorm statistics recomputed on %s%s", precise.describe(),
                     f", {len(frozen_bn)} frozen layers left alone" if frozen_bn else "")

        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # only here: it needs the tensorboard package

            self.board = SummaryWriter(cfg.tensorboard)
        final = FinalVersion(self.client, layout)
        if cfg.every is not None:
            final.start()
        last = -1  # the last version evaluated
        due = 0.0  # monotonic time of the next evaluation (--every)
        try:
            while not self.stop.is_set():
                self._wait_until(due, final.ready)
                if final.ready.is_set() and final.header.version > last:
                    header, pulled = final.header, final.regions
                else:
                    try:
                        # Blocks server-side (up to the pull wait) until a version newer than the last exists.
                        header, pulled = self.client.pull(wire_regions, min_version=last + 1), wire_regions
                    except ServerRestarted as exc:
                        last = self._rejoin(exc, layout.hash, last)
                        continue
                if header.version > last:
                    due = time.monotonic() + (cfg.every or 0.0)
                    if pulled is not model_regions:
                        for dst, src in zip(model_regions, pulled):
                            dst.copy_(src)
                    # evaluate looked up here, at call time: tests replace it
                    metrics, extra = evaluate_precise(model, loader, device, precise, frozen_bn, score=evaluate)
                    record = {"version": header.version, **metrics.to_dict(), **extra, "time": round(time.time(), 3)}
                    self._publish(record)
                    if best is not None and best.offer(record, metrics, model.state_dict()):
                        log.info("[eval] version %d is the best so far: saved to %s", header.version,
                                 best.directory / BEST_MODEL)
                    last = header.version
                if header.done:
                    log.info("[eval] the run is done; last version evaluated: %d", last)
                    break
                if cfg.every is None:
                    break
        finally:
            final.stop()
            if self.board is not None:
                self.board.close()
        self.client.leave()
        return self.records

    def _load_frozen(self, model: torch.nn.Module, info: JoinInfo) -> None:
        """Pulls the tensors a frozen-backbone run never changes, once."""
        load_frozen(self.client, model, info)

    def _rejoin(self, exc: Exception, layout_hash: str, last: int) -> int:
        """Joins a restarted server again; returns the new ``last`` version evaluated."""
        log.warning("[eval] %s; joining again", exc)
        info = self._join()
        if info.layout.hash != layout_hash:
            raise RunFailed("the restarted server has a different model layout") from None
        # A server restarted from an older checkpoint recomputes versions we saw: score them again.
        return min(last, info.version - 1)

    def _publish(self, record: dict) -> None:
        """Prints the record as one JSON line and appends it to ``--out``."""
        line = json.dumps(record)
        print(line, flush=True)
        if self.config.out:
            out = pathlib.Path(self.config.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(line + "\n")
        if self.board is not None:
            for key in ("top1", "top5", "loss", "top1_running_stats"):
                if key in record:
                    self.board.add_scalar(f"eval/{key}", record[key], global_step=record["version"])
            self.board.flush()  # evaluations are rare: show each one at once rather than every 2 minutes
        self.records.append(record)
        log.info("[eval] version %d: top1 %.4f, top5 %.4f, loss %.4f on %d samples%s", record["version"],
                 record["top1"], record["top5"], record["loss"], record["samples"],
                 f" (top1 {record['top1_running_stats']:.4f} with the running BatchNorm statistics)"
                 if "top1_running_stats" in record else "")

    def _wait_until(self, due: float, done: threading.Event) -> None:
        """Sleeps until ``due`` (monotonic); returns early when stopped or when the run is ``done``."""
        while not self.stop.is_set() and not done.is_set():
            remaining = due - time.monotonic()
            if remaining <= 0:
                return
            done.wait(min(WAIT_SLICE_S, remaining))


class FinalVersion:
    """Fetches the final version the moment the server says the run is done, on a daemon thread.

    The server exits seconds after the run is done, while one evaluation can take
    minutes: pulling the final weights only after the evaluation in progress would
    find the server gone. So a background Pull asks for a version that never comes;
    the server answers it (header only) when the run is done, and the final weights
    are pulled into ``regions`` at once, ready for the evaluation loop.

    Args:
        client: the evaluator's joined client (gRPC channels are thread-safe).
        layout: the server's layout.
    """

    def __init__(self, client: ParameterClient, layout: Layout):
        self.layout = layout
        self.regions: list[torch.Tensor] = []  # allocated by start(): --once needs no second copy
        self.header = None  # the final version's header, once ``regions`` hold it
        self.ready = threading.Event()
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="final-version", daemon=True)

    def start(self) -> None:
        """Starts watching."""
        self.regions = self.layout.empty_regions()
        self._thread.start()

    def stop(self) -> None:
        """Stops watching (a Pull in flight ends within the pull wait, or when the channel closes)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._client.pull(self.regions, min_version=NEVER).done:
                    self.header = self._client.pull(self.regions, min_version=0)
                    self.ready.set()
                    return
            except ServerRestarted:
                self._stop.wait(WAIT_SLICE_S)  # the evaluation loop joins again; then carry on watching
            except Exception as exc:  # the evaluation loop meets the same failure and reports it
                log.debug("[eval] final-version watch ended: %s", exc)
                return
