"""The training loop of one worker, readable top to bottom.

join → build the model the server names → bind its tensors to flat buffers →
loop { pull the global model; one forward/backward on the shard; push the
gradients and BatchNorm statistics } until the server says the run is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from paramhub.common.config import WorkerConfig, staleness_bound_from_wire
from paramhub.common.data import leased_dataset, seed_augmentation, shard_loader, training_shard
from paramhub.common.layout import BUFFER, PARAM, Layout, bind_model
from paramhub.common.models import build_model
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.runtime import recheck_threads
from paramhub.worker.client import RunFailed, ServerRestarted
from paramhub.worker.interface import ParameterClient
from paramhub.worker.leases import LeasedBatches, SampleLog
from paramhub.worker.overlap import OverlappedClient, overlap_refusal

log = logging.getLogger("paramhub.worker")


@dataclasses.dataclass
class TrainSummary:
    """What a worker did, for its exit message and for tests."""

    steps: int = 0
    pushes_accepted: int = 0
    pushes_dropped: int = 0
    final_version: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    stopped: bool = False  # asked to stop (SIGTERM) before the run was done: it left after its last step


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RunFailed("--device cuda was asked for, but no CUDA device is available")
    return torch.device(requested)


def endless(loader: DataLoader, epochs: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cycles through the loader epoch after epoch (reshuffled each time), endlessly or for ``epochs`` passes."""
    epoch = 0
    while epochs is None or epoch < epochs:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RunFailed("the data shard is empty")
        epoch += 1


class Heartbeat:
    """Renews the worker's lease on a daemon thread."""

    def __init__(self, client: ParameterClient, interval: float):
        self._client = client
        self._interval = max(0.1, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._client.heartbeat()
            except Exception as exc:  # the training loop sees real failures itself
                log.debug("heartbeat failed: %s", exc)


class Progress:
    """A tqdm bar on a terminal: samples trained (its rate is samples/s), with the step, version and loss.

    Off unless stderr is a terminal: in logs, containers and tests the ``--log-every``
    lines say the same without a bar's carriage returns.

    Args:
        desc: the bar's label (the worker's log prefix).
        enabled: force the bar on or off (default: whether stderr is a terminal).
    """

    def __init__(self, desc: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._desc = desc
        self._bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Progress":
        if self.enabled:
            # Log lines go through tqdm.write, so they print above the bar instead of through it.
            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(
                tqdm(desc=self._desc, unit=" samples", unit_scale=True, dynamic_ncols=True, file=sys.stderr))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def update(self, samples: int, step: int, version: int, loss: float) -> None:
        """Counts one push of ``samples`` samples."""
        if self._bar is not None:
            # A dict keeps this order; keyword arguments would come out sorted.
            self._bar.set_postfix({"step": step, "version": version, "loss": f"{loss:.4f}"}, refresh=False)
            self._bar.update(samples)


class GradientStep:
    """Gradient mode: one forward/backward; the update is the gradient of the PARAM tensors."""

    kind = pb.PUSH_KIND_GRADIENT

    def __init__(self, model: nn.Module, layout: Layout, frozen_modules: list[nn.Module]):
        self.model = model
        self.frozen_modules = frozen_modules
        self.params = dict(model.named_parameters())
        self.slots = [t for t in layout.tensors if t.role == PARAM]
        self.loss_fn = nn.CrossEntropyLoss()

    def compute(self, batches: Iterator, device: torch.device, update: dict[int, torch.Tensor]) -> tuple[int, float]:
        """Fills ``update`` (PARAM region -> flat CPU tensor); returns (samples, mean loss)."""
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        train_mode(self.model, self.frozen_modules)
        self.model.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model(images), labels)
        loss.backward()
        for slot in self.slots:
            grad = self.params[slot.name].grad
            target = update[slot.region][slot.offset : slot.offset + slot.numel]
            target.copy_(grad.reshape(-1), non_blocking=True) if grad is not None else target.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the asynchronous device-to-host copies must land before the push
        return len(labels), float(loss.detach())


class LocalSGD:
    """Averaging mode: H local steps of SGD with momentum; the update is ``w_local - w_base``.

    The local optimizer's momentum carries over from one round to the next, as in
    DiLoCo's inner optimizer.
    """

    kind = pb.PUSH_KIND_DELTA

    def __init__(self, model: nn.Module, layout: Layout, run: pb.RunSpec, model_regions: list[torch.Tensor],
                 frozen_modules: list[nn.Module]):
        self.model = model
        self.frozen_modules = frozen_modules
        self.local_steps = max(1, run.local_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=run.local_lr, momentum=run.local_momentum)
        self.loss_fn = nn.CrossEntropyLoss()
        self.param_regions = {r: model_regions[r] for r in layout.region_indices(PARAM)}

    def compute(self, batches: Iterator, device: torch.device, update: dict[int, torch.Tensor]) -> tuple[int, float]:
        """Trains H steps from the pulled weights and fills ``update`` with the delta."""
        base = {r: flat.clone() for r, flat in self.param_regions.items()}
        train_mode(self.model, self.frozen_modules)
        samples, loss_sum = 0, 0.0
        for step in range(self.local_steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                if step == 0:
                    raise
                break  # the data ran out mid-round: push the steps taken
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=False)
            loss = self.loss_fn(self.model(images), labels)
            loss.backward()
            self.optimizer.step()
            samples += len(labels)
            loss_sum += float(loss.detach()) * len(labels)
        for r, flat in self.param_regions.items():
            update[r].copy_(flat - base[r])
        return samples, loss_sum / samples


def check_layout(model: nn.Module, layout: Layout, arch: str) -> None:
    """Raises RunFailed unless our model lays out the server's tensors exactly as the server does."""
    names = [t.name for t in layout.tensors]
    if names and Layout.from_model(model, names).hash == layout.hash:
        return
    raise RunFailed(f"the server's {arch} has a different layout from ours; "
                    "are torch/torchvision the same version on both sides?")


def freeze(model: nn.Module, frozen_names: set[str]) -> list[nn.Module]:
    """Stops gradients for frozen parameters; returns the BatchNorm layers that must stay in eval mode.

    A frozen backbone's running statistics must not drift on the workers: they
    never travel, so each worker would otherwise end up with different ones.
    """
    for name, param in model.named_parameters():
        if name in frozen_names:
            param.requires_grad_(False)
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in frozen_names]


def train_mode(model: nn.Module, frozen_modules: list[nn.Module]) -> None:
    """``model.train()``, except for frozen BatchNorm layers."""
    model.train()
    for module in frozen_modules:
        module.eval()


def load_frozen(client: ParameterClient, model: nn.Module, info) -> None:
    """Pulls the tensors a frozen-backbone run never changes (once) into ``model``."""
    check_layout(model, info.frozen_layout, info.model.arch)
    regions = info.frozen_layout.empty_regions()
    client.pull_frozen(regions)
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in info.frozen_layout.views(regions).items():
            own[name].copy_(tensor)


@dataclasses.dataclass
class _Session:
    """What one worker trains with: built once after Join, kept across rejoins (the layout cannot change)."""

    prefix: str  # "[worker i/n]" for log lines
    layout: Layout
    device: torch.device
    work: "GradientStep | LocalSGD"
    batches: Iterator
    wire_regions: list[torch.Tensor]  # what pulls land in (on the CPU, the model's own memory)
    model_regions: list[torch.Tensor]  # the model's tensors (on CUDA, device copies of wire_regions)
    update: dict[int, torch.Tensor]  # the PARAM regions of an update, filled by work.compute
    push_regions: list[torch.Tensor]  # every region of a push: the update's PARAM regions, the buffers
    leased: LeasedBatches | None = None  # data leases: batches come from the positions the server leases
    sample_log: SampleLog | None = None  # --sample-log: every push's samples, for checking exactly-once
    idle: bool = False  # data leases: the last step found nothing leased (we hold the server's version, unpushed)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclasses.dataclass(frozen=True)
class _Step:
    """One pull-compute-push exchange: ``reply`` None when the run or the data ended before a push."""

    version: int  # the version computed from (or the final one)
    reply: pb.PushResponse | None = None
    num_samples: int = 0
    loss: float = 0.0
    idle: bool = False  # data leases: nothing was leased to us; pull again once the version moves


class Trainer:
    """Trains one shard against the parameter server.

    Args:
        config: the worker's settings.
        client: a connected, not yet joined ParameterClient (PSClient, or PartitionedClient over partitions).
        stop: once set (ps-worker sets it on SIGTERM), the worker finishes its step, leaves and returns: the
            server stops counting it at once and gives its data leases to the others.
    """

    def __init__(self, config: WorkerConfig, client: ParameterClient, stop: threading.Event | None = None):
        self.config = config
        self.client = client
        self.stop = stop or threading.Event()

    def run(self) -> TrainSummary:
        """Trains until the server says the run is done; returns a summary."""
        cfg = self.config
        info = self.client.join(name=cfg.name or f"shard-{cfg.shard}", shard=cfg.shard)
        session = self._prepare(info)
        client = self._transfers(info, session)
        summary = TrainSummary()
        version = info.version
        with Heartbeat(client, info.run.heartbeat_interval_s or cfg.timeouts.heartbeat), \
                Progress(session.prefix) as progress:
            while True:
                if self.stop.is_set():
                    log.info("%s asked to stop: leaving at version %d", session.prefix, version)
                    summary.stopped = True
                    break
                try:
                    step = self._step(client, session, version)
                except ServerRestarted as exc:
                    version = self._rejoin(client, session, info, exc)
                    continue
                summary.final_version = step.version
                if step.idle:
                    version = step.version + 1  # others hold the rest of the epoch: wait for the next update
                    continue
                if step.reply is None:
                    break
                self._record(summary, session, step, progress)
                if step.reply.done:
                    break
                version = step.reply.next_version
        client.leave()
        if session.sample_log is not None:
            session.sample_log.close()
        log.info("%s done after %d steps at version %d", session.prefix, summary.steps, summary.final_version)
        return summary

    def _prepare(self, info) -> _Session:
        """Builds the model the server names, binds it to flat buffers, and opens the shard's data."""
        cfg = self.config
        num_shards = cfg.num_shards or info.run.num_workers
        model = build_model(info.model.arch, info.model.num_classes)
        layout = info.layout
        check_layout(model, layout, info.model.arch)
        device = resolve_device(cfg.device)
        on_cuda = device.type == "cuda"
        model.to(device)
        frozen_modules = self._load_frozen(model, info) if info.frozen_layout is not None else []
        # Pulls write into wire_regions and pushes read from them. On the CPU the model's
        # tensors are views into the same memory, so a pull updates the model with no copy.
        wire_regions = layout.empty_regions(pin_memory=on_cuda)
        model_regions = layout.empty_regions(device) if on_cuda else wire_regions
        bind_model(model, layout, model_regions)
        # pinned on CUDA, so gradients come off the device asynchronously
        update = {r: torch.zeros(wire_regions[r].shape, dtype=wire_regions[r].dtype, pin_memory=on_cuda)
                  for r in layout.region_indices(PARAM)}
        work = {
            "grad": lambda: GradientStep(model, layout, frozen_modules),
            "avg": lambda: LocalSGD(model, layout, info.run, model_regions, frozen_modules),
        }[info.run.update]()
        seed_augmentation(cfg.seed, cfg.shard)
        data, batches, leased = self._open_data(info, num_shards, on_cuda)
        sample_log = SampleLog(cfg.sample_log, leased) if cfg.sample_log and leased is not None else None
        what = "samples in the dataset, leased by the server" if leased is not None else "samples in shard"
        prefix = f"[worker {cfg.shard}/{num_shards}]" if leased is None else f"[worker {info.name}]"
        log.info("%s joined as id %d at version %d: %s, %d classes, %d %s, %s/%s, device %s", prefix,
                 info.worker_id, info.version, info.model.arch, info.model.num_classes, len(data), what, info.run.mode,
                 info.run.update, device)
        return _Session(prefix=prefix, layout=layout, device=device, work=work, batches=batches,
                        wire_regions=wire_regions, model_regions=model_regions, update=update,
                        push_regions=[update.get(r, wire_regions[r]) for r in range(len(layout.regions))],
                        leased=leased, sample_log=sample_log)

    def _open_data(self, info, num_shards: int, on_cuda: bool) -> tuple:
        """(dataset, batches, None) of this worker's shard, or (dataset, None, LeasedBatches) under data leases."""
        cfg = self.config
        if info.run.data_leases:
            if cfg.epochs is not None:
                log.warning("[worker %s] --epochs has no effect under data leases: the server counts the epochs "
                            "(ps-server --epochs)", info.name)
            data, fingerprint = leased_dataset(cfg.data, num_classes=info.model.num_classes,
                                               image_size=cfg.image_size, augment=cfg.augment, seed=cfg.seed,
                                               synthetic_size=cfg.synthetic_size)
            steps = info.run.local_steps if info.run.update == "avg" else 1
            return data, None, LeasedBatches(data, fingerprint, info.run.lease_seed, cfg.batch_size, steps)
        data = training_shard(cfg.data, cfg.shard, num_shards, num_classes=info.model.num_classes,
                              image_size=cfg.image_size, augment=cfg.augment, seed=cfg.seed,
                              synthetic_size=cfg.synthetic_size)
        loader = shard_loader(data, cfg.batch_size, cfg.shard, cfg.seed, num_workers=cfg.loader_workers,
                              pin_memory=on_cuda)
        return data, endless(loader, cfg.epochs), None

    def _transfers(self, info, session: _Session) -> ParameterClient:
        """The client the loop talks to: ours, or it wrapped to overlap transfers with the steps."""
        cfg = self.config
        # By default only on a GPU: on the CPU the step and the transfer compete for the same cores, and
        # overlap measured slower there, besides the extra staleness (BENCHMARKS.md "Overlap").
        overlap = cfg.overlap if cfg.overlap is not None else session.on_cuda
        refusal = overlap_refusal(info.run)
        if overlap and not refusal:
            return OverlappedClient(self.client, session.layout,
                                    staleness_bound=staleness_bound_from_wire(info.run.staleness_bound))
        if cfg.overlap:
            log.warning("[worker %d] --overlap has no effect: %s", cfg.shard, refusal)
        return self.client

    def _step(self, client: ParameterClient, session: _Session, version: int) -> _Step:
        """Pulls at least ``version``, computes one update on the shard (or the leased data), pushes it."""
        if session.leased is not None:
            return self._leased_step(client, session, version)
        header = client.wait_and_pull(session.wire_regions, version)
        if header.done:
            return _Step(header.version)
        if session.on_cuda:
            for dst, src in zip(session.model_regions, session.wire_regions):
                dst.copy_(src, non_blocking=True)
        try:
            num_samples, loss = session.work.compute(session.batches, session.device, session.update)
        except StopIteration:  # --epochs passes are done: push nothing more, leave
            log.info("%s finished %d epoch(s) over the shard", session.prefix, self.config.epochs)
            return _Step(header.version)
        if session.on_cuda:
            for r in session.layout.region_indices(BUFFER):
                session.wire_regions[r].copy_(session.model_regions[r])
        reply = client.push(session.work.kind, header.version, session.push_regions, num_samples=num_samples,
                            loss=loss)
        return _Step(header.version, reply, num_samples, loss)

    def _leased_step(self, client: ParameterClient, session: _Session, version: int) -> _Step:
        """``_step`` under data leases: the pull brings the leases, the push names the positions it trained on.

        After an idle step (nothing leased) ``version`` is one past the weights we
        hold, and a header-only reply that brings leases is trained on those weights:
        nothing of ours was pushed from them. Otherwise a header-only reply (the
        server's wait ended first) is pulled again, as ``wait_and_pull`` does.
        """
        leased = session.leased
        while True:
            header = client.pull(session.wire_regions, version, leases=leased.request())
            if header.done or header.version >= version:
                break
            if session.idle and header.leases and header.version == version - 1:
                break  # leases for the weights we already hold
        if header.done:
            return _Step(header.version)
        spans = leased.plan(header.leases)
        session.idle = not spans
        if not spans:
            return _Step(header.version, idle=True)
        if session.on_cuda:
            for dst, src in zip(session.model_regions, session.wire_regions):
                dst.copy_(src, non_blocking=True)
        num_samples, loss = session.work.compute(leased.batches(spans), session.device, session.update)
        if session.on_cuda:
            for r in session.layout.region_indices(BUFFER):
                session.wire_regions[r].copy_(session.model_regions[r])
        announce = session.sample_log.record if session.sample_log is not None else None
        reply = client.push(session.work.kind, header.version, session.push_regions, num_samples=num_samples,
                            loss=loss, trained=spans, announce=announce)
        return _Step(header.version, reply, num_samples, loss)

    def _rejoin(self, client: ParameterClient, session: _Session, info, exc: ServerRestarted) -> int:
        """Joins a restarted server again (a new incarnation); returns the version to go on from.

        The work in hand was based on a model the new server may not have: it is dropped.
        """
        log.warning("%s %s; joining again", session.prefix, exc)
        rejoined = client.join(name=info.name, shard=self.config.shard)
        if rejoined.layout.hash != session.layout.hash:
            raise RunFailed("the restarted server has a different model layout") from None
        return rejoined.version

    def _record(self, summary: TrainSummary, session: _Session, step: _Step, progress: "Progress") -> None:
        """Counts one pushed step in the summary, the progress bar and the log."""
        summary.steps += 1
        recheck_threads()  # --threads 0: follow the local paramhub processes (at most every few seconds)
        summary.losses.append(step.loss)
        if step.reply.outcome == pb.PUSH_OUTCOME_ACCEPTED:
            summary.pushes_accepted += 1
        else:
            summary.pushes_dropped += 1
        progress.update(step.num_samples, summary.steps, step.reply.version, step.loss)
        if self.config.log_every and summary.steps % self.config.log_every == 0:
            log.info("%s step %d: version %d, loss %.4f", session.prefix, summary.steps, step.version, step.loss)
        summary.final_version = step.reply.version

    def _load_frozen(self, model: nn.Module, info) -> list[nn.Module]:
        """Pulls the frozen tensors once, loads them and freezes them; returns the frozen BatchNorm layers."""
        load_frozen(self.client, model, info)
        return freeze(model, {t.name for t in info.frozen_layout.tensors})
