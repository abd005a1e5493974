"""``ps-bench versus-ddp``: paramhub's modes beside torch DDP, on the same real images, model and recipe.

Every run trains the same model from the same initial weights (the server's, written
out once per seed) on the same shards (``ps-data split``: N shards and a held-out
val): DDP as N gloo processes (``paramhub.tools.ddp``), each paramhub mode as a real
ps-server and N ps-workers. All runs stop at the same number of training samples.
Checkpoints are scored afterwards by one plain-torchvision evaluation on the held-out
images, so scoring never slows a run. Reported per run: top-1 at the end (equal
samples), the best top-1 seen, samples per second, and wall seconds from launch to
the target accuracy (DDP's final top-1 in the same scenario and seed, unless given).

A run in which a process fails is an error, not a row: an async run so short that it
ends before a late-starting worker joins fails that worker (it finds no server), and
the bench says so instead of reporting a run with fewer workers.

Scenarios: ``equal`` (every worker alike); ``straggler`` (worker 1 — DDP rank 1 — held
to a third of one core by a cgroup CPU quota, root only); ``slow-link`` (the server,
or DDP's ranks, behind 100 Mbit/s links made with network namespaces and ``tc tbf``,
root only). A scenario that cannot run here is reported as skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
from typing import Iterator

import torch

from paramhub.common.checkpoint import list_checkpoints, load_model_state
from paramhub.tools.cluster import LocalCluster

# name -> (server flags, versions per DDP step given N workers and H local steps)
MODES = {
    "sync-grad": (["--mode", "sync", "--update", "grad"], lambda n, h: 1.0),
    "async-grad": (["--mode", "async", "--update", "grad", "--staleness", "2"], lambda n, h: float(n)),
    "diloco": (["--mode", "sync", "--update", "avg", "--outer-optimizer", "nesterov"], lambda n, h: 1.0 / h),
    "async-diloco": (["--mode", "async", "--update", "avg", "--outer-optimizer", "nesterov", "--staleness", "2"],
                     lambda n, h: n / h),
    # the same runs with compressed pushes (common/codecs), against their fp32 runs above
    "sync-grad-int8": (["--mode", "sync", "--update", "grad", "--codec", "int8"], lambda n, h: 1.0),
    "sync-grad-topk2bit": (["--mode", "sync", "--update", "grad", "--codec", "topk2bit:ratio=0.01"],
                           lambda n, h: 1.0),
    "sync-grad-topk2bit5": (["--mode", "sync", "--update", "grad", "--codec", "topk2bit:ratio=0.05"],
                            lambda n, h: 1.0),
    "diloco-topk2bit": (["--mode", "sync", "--update", "avg", "--outer-optimizer", "nesterov",
                         "--codec", "topk2bit:ratio=0.01"], lambda n, h: 1.0 / h),
    # data by lease (ps/leases.py): every worker draws from the whole set, each sample once per epoch
    "sync-grad-leases": (["--mode", "sync", "--update", "grad", "--data-leases"], lambda n, h: 1.0),
    "async-grad-leases": (["--mode", "async", "--update", "grad", "--staleness", "2", "--data-leases"],
                          lambda n, h: float(n)),
    # no staleness bound: a fast worker never waits for a slow one (the straggler scenario)
    "async-grad-unbounded": (["--mode", "async", "--update", "grad"], lambda n, h: float(n)),
    "async-diloco-unbounded": (["--mode", "async", "--update", "avg", "--outer-optimizer", "nesterov"],
                               lambda n, h: n / h),
}
# DDP on paramhub's shards (the reference every table compares with), or with its own DistributedSampler
DDP_RUNS = {"ddp": "shards", "ddp-distributed": "distributed"}
SCENARIOS = ("equal", "straggler", "slow-link")
CGROUP_CPU = pathlib.Path("/sys/fs/cgroup/cpu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One comparison: data, model, recipe, and what runs."""

    data: str | None = None  # an ImageFolder; None: scikit-learn's digits, written into the work directory
    model: str = "resnet18"
    image_size: int = 32
    workers: int = 2
    batch_size: int = 32
    steps: int = 200  # DDP steps; every run stops after steps × workers × batch samples
    lr: float = 0.05
    momentum: float = 0.9
    local_steps: int = 4
    eval_every: int = 20  # in DDP steps
    seeds: tuple[int, ...] = (0,)
    modes: tuple[str, ...] = ("sync-grad", "async-grad", "diloco")
    scenarios: tuple[str, ...] = ("equal",)
    val_fraction: float = 0.2
    augment: str = "auto"
    target: float | None = None  # top-1 to time; None: DDP's final top-1 in the same scenario and seed
    straggler_share: float = 1 / 3  # of one core, for the straggler
    link_mbit: float = 100.0

    def __post_init__(self):
        unknown = set(self.modes) - set(MODES) - set(DDP_RUNS)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join([*MODES, *DDP_RUNS])}")
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        if self.steps % self.local_steps or self.eval_every % self.local_steps:
            raise ValueError("--steps and --eval-every must be multiples of --local-steps")


# -- data and scoring ---------------------------------------------------------------------


def prepare_data(settings: Settings, work: pathlib.Path) -> tuple[pathlib.Path, int]:
    """Splits the images into N shards and a held-out val (once per work directory); returns (split, classes)."""
    from paramhub.common.shards import split_dataset

    split = work / "split"
    if not split.is_dir():
        source = settings.data
        if source is None:
            from paramhub.tools.digits import write_digits

            source = work / "images"
            if not source.is_dir():
                write_digits(source, settings.image_size)
        split_dataset(str(source), str(split), settings.workers, val_fraction=settings.val_fraction, seed=0)
    classes = json.loads((split / "manifest.json").read_text())["classes"]
    return split, len(classes)


class HeldOut:
    """The held-out images, preprocessed once as a user's evaluation would (resize, center crop, normalize)."""

    def __init__(self, val_dir: pathlib.Path, image_size: int):
        from paramhub.common.data import eval_transform, image_folder

        folder = image_folder(val_dir, eval_transform(image_size))
        self.images = torch.stack([folder[i][0] for i in range(len(folder))])
        self.labels = torch.tensor(folder.targets)

    def top1(self, model: torch.nn.Module, state: dict) -> float:
        model.load_state_dict(state, strict=True)
        model.eval()
        with torch.no_grad():
            return float((model(self.images).argmax(1) == self.labels).float().mean())


# -- the runs -----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one run produced: (samples, wall seconds, file) of each saved model, and how long it took."""

    name: str
    scenario: str
    seed: int
    saved: list[tuple[int, float, pathlib.Path]]
    wall_s: float
    samples: int
    rows: list[dict] = dataclasses.field(default_factory=list)  # filled by scoring


def initial_weights(settings: Settings, classes: int, seed: int, path: pathlib.Path) -> None:
    """The weights ps-server starts from for this seed, as a file DDP loads."""
    from safetensors.torch import save_file

    from paramhub.common.models import initial_state

    state = initial_state(settings.model, classes, seed).state
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def run_ddp(settings: Settings, split: pathlib.Path, classes: int, seed: int, scenario: str,
            work: pathlib.Path, limits: "Limits", name: str = "ddp") -> Run:
    """Trains DDP (``name`` picks its sampler, ``DDP_RUNS``) for one seed; rank 0's models every ``eval_every``
    steps."""
    from paramhub.tools.ddp import DDPSpec, launch

    out = work / f"{scenario}-{name}-seed{seed}"
    init = work / f"init-seed{seed}.safetensors"
    if not init.exists():
        initial_weights(settings, classes, seed, init)
    started = time.time()
    spec = DDPSpec(arch=settings.model, num_classes=classes, data=str(split), image_size=settings.image_size,
                   batch_size=settings.batch_size, steps=settings.steps, lr=settings.lr, momentum=settings.momentum,
                   augment=settings.augment, seed=seed, init=str(init), out=str(out), world_size=settings.workers,
                   save_every=settings.eval_every, sampler=DDP_RUNS[name], started=started)
    launch(spec, env=limits.env(), prefix=limits.ddp_prefixes(settings.workers), timeout=3600)
    per_step = settings.workers * settings.batch_size
    saved = [(int(p.stem.split("-")[1]) * per_step, p.stat().st_mtime - started, p)
             for p in sorted(out.glob("model-*.safetensors"))]
    return Run(name, scenario, seed, saved, time.time() - started, settings.steps * per_step)


def run_paramhub(settings: Settings, mode: str, split: pathlib.Path, classes: int, seed: int, scenario: str,
                 work: pathlib.Path, limits: "Limits") -> Run:
    """Trains one paramhub mode (a real ps-server and ps-workers) to DDP's samples; its checkpoints as it goes."""
    flags, versions_per_step = MODES[mode]
    vps = versions_per_step(settings.workers, settings.local_steps)
    samples_per_version = settings.workers * settings.batch_size / vps
    ckpt = work / f"{scenario}-{mode}-seed{seed}" / "ckpt"
    started = time.time()
    with LocalCluster(ckpt.parent, env=limits.env()) as cluster:
        cluster.start_server(
            "--model", settings.model, "--num-classes", str(classes), "--seed", str(seed),
            "--workers", str(settings.workers), "--max-steps", str(round(settings.steps * vps)),
            "--lr", str(settings.lr), "--momentum", str(settings.momentum),
            "--local-lr", str(settings.lr), "--local-momentum", str(settings.momentum),
            "--local-steps", str(settings.local_steps), "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", str(max(1, round(settings.eval_every * vps))), "--keep-checkpoints", "100000",
            *flags, *limits.server_flags(), timeout=120, wrapper=limits.server_prefix())
        for shard in range(settings.workers):
            cluster.start_worker(shard, "--data", str(split), "--image-size", str(settings.image_size),
                                 "--batch-size", str(settings.batch_size), "--augment", settings.augment,
                                 "--seed", str(seed), "--log-every", "0", "--device", "cpu",
                                 server=limits.server_address(cluster), wrapper=limits.worker_prefix(shard))
        codes = cluster.wait(timeout=3600)
    if any(codes.values()):
        raise RuntimeError(f"{mode}: processes failed {codes}; logs in {ckpt.parent}")
    saved = [(round(int(p.name[6:15]) * samples_per_version), p.stat().st_mtime - started, p)
             for p in list_checkpoints(ckpt) if int(p.name[6:15]) > 0]
    return Run(mode, scenario, seed, saved, time.time() - started, settings.steps * settings.workers
               * settings.batch_size)


# -- scenarios: what slows whom -----------------------------------------------------------


class Limits:
    """No limits: every process runs as it is (the ``equal`` scenario).

    A scenario overrides what it changes: the environment of every process, a
    command prefix per DDP rank, per worker and for the server, the server's extra
    flags, and the address workers reach it at (None: the cluster's loopback one).
    """

    def env(self) -> dict[str, str]:
        return {}

    def ddp_prefixes(self, world_size: int) -> dict[int, list[str]]:
        return {}

    def worker_prefix(self, shard: int) -> tuple[str, ...]:
        return ()

    def server_prefix(self) -> tuple[str, ...]:
        return ()

    def server_flags(self) -> list[str]:
        return []

    def server_address(self, cluster: LocalCluster) -> str | None:
        return None


class Straggler(Limits):
    """Worker 1 (DDP rank 1) in a cgroup whose CPU quota is ``share`` of one core."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def _enter(self) -> list[str]:
        # The child writes its own pid into the cgroup, then becomes the real command.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def ddp_prefixes(self, world_size: int) -> dict[int, list[str]]:
        return {1: self._enter()}

    def worker_prefix(self, shard: int) -> tuple[str, ...]:
        return tuple(self._enter()) if shard == 1 else ()


@contextlib.contextmanager
def straggler_limits(share: float) -> Iterator[Straggler]:
    """A cgroup (v1 ``cpu``) capped at ``share`` of a core, removed afterwards."""
    if os.geteuid() != 0 or not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        raise Skipped("needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    path = CGROUP_CPU / f"paramhub-straggler-{os.getpid()}"
    path.mkdir()
    try:
        (path / "cpu.cfs_period_us").write_text("100000")
        (path / "cpu.cfs_quota_us").write_text(str(int(100000 * share)))
        yield Straggler(path)
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (CGROUP_CPU / "cgroup.procs").write_text(pid)
        path.rmdir()


class Skipped(Exception):
    """A scenario that cannot run on this machine; the message says why."""


# -- scoring and the table ----------------------------------------------------------------


def score(run: Run, held_out: HeldOut, model_name: str, classes: int) -> None:
    """Fills ``run.rows``: each saved model's samples, wall seconds and held-out top-1."""
    from safetensors.torch import load_file

    from paramhub.common.models import build_model

    model = build_model(model_name, classes)
    for samples, seconds, path in run.saved:
        state = load_file(path) if run.name in DDP_RUNS else load_model_state(path)
        run.rows.append({"samples": samples, "seconds": round(seconds, 2), "top1": held_out.top1(model, state)})


def summarise(runs: list[Run], target: float | None) -> list[dict]:
    """One line per (scenario, run): means over seeds of final and best top-1, samples/s and time to target."""
    lines = []
    keys = sorted({(r.scenario, r.name) for r in runs}, key=lambda k: (SCENARIOS.index(k[0]), k[1] != "ddp", k[1]))
    for scenario, name in keys:
        mine = [r for r in runs if r.scenario == scenario and r.name == name]
        to_target = []
        for run in mine:
            ddp = next((r for r in runs if r.scenario == scenario and r.name == "ddp" and r.seed == run.seed), None)
            goal = target if target is not None else (ddp.rows[-1]["top1"] if ddp and ddp.rows else None)
            hit = next((row["seconds"] for row in run.rows if goal is not None and row["top1"] >= goal), None)
            to_target.append(hit)
        reached = [t for t in to_target if t is not None]
        lines.append({
            "scenario": scenario, "run": name, "seeds": [r.seed for r in mine],
            "final_top1": statistics.mean(r.rows[-1]["top1"] for r in mine),
            "best_top1": statistics.mean(max(row["top1"] for row in r.rows) for r in mine),
            "final_top1_per_seed": [r.rows[-1]["top1"] for r in mine],
            "samples_per_s": statistics.mean(r.samples / r.wall_s for r in mine),
            "wall_s": statistics.mean(r.wall_s for r in mine),
            "to_target_s": statistics.mean(reached) if len(reached) == len(mine) else None,
            "reached_target": f"{len(reached)}/{len(mine)}",
        })
    return lines


def format_table(lines: list[dict], skipped: dict[str, str]) -> str:
    """The summary as a text table (to target: against DDP's in the same scenario), then the skipped scenarios."""
    width = max([13] + [len(line["run"]) for line in lines])  # the run names, aligned
    head = (f"{'scenario':<10} {'run':<{width}} {'top1 final':>10} {'best':>6} {'samples/s':>9} {'wall s':>7} "
            f"{'to target s':>11} {'vs DDP':>7}  per seed")
    out = [head]
    for line in lines:
        ddp = next((x for x in lines if x["scenario"] == line["scenario"] and x["run"] == "ddp"), None)
        ratio = (f"{line['to_target_s'] / ddp['to_target_s']:.2f}x"
                 if ddp and line["to_target_s"] and ddp["to_target_s"] else "-")
        target = f"{line['to_target_s']:.1f}" if line["to_target_s"] is not None else f"({line['reached_target']})"
        out.append(f"{line['scenario']:<10} {line['run']:<{width}} {line['final_top1']:>10.3f} "
                   f"{line['best_top1']:>6.3f} {line['samples_per_s']:>9.1f} {line['wall_s']:>7.1f} {target:>11} "
                   f"{ratio:>7}  "
                   + " ".join(f"{t:.3f}" for t in line["final_top1_per_seed"]))
    for scenario, why in skipped.items():
        out.append(f"{scenario:<10} skipped: {why}")
    return "\n".join(out)


@contextlib.contextmanager
def scenario_limits(name: str, settings: Settings) -> Iterator[Limits]:
    """What slows whom in scenario ``name``; raises Skipped where it cannot run here."""
    if name == "equal":
        yield Limits()
    elif name == "straggler":
        with straggler_limits(settings.straggler_share) as limits:
            yield limits
    else:
        from paramhub.tools.slow_link import slow_link_limits

        with slow_link_limits(settings.workers, settings.link_mbit) as limits:
            yield limits


def run(settings: Settings, workdir: str | None = None, echo=print) -> dict:
    """Every scenario × seed × (DDP and each mode); returns {"settings", "lines", "skipped", "runs"}."""
    work = pathlib.Path(workdir or tempfile.mkdtemp(prefix="paramhub-versus-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    split, classes = prepare_data(settings, work)
    held_out = HeldOut(split / "val", settings.image_size)
    runs, skipped = [], {}
    for scenario in settings.scenarios:
        try:
            with scenario_limits(scenario, settings) as limits:
                for seed in settings.seeds:
                    for name in ("ddp", *(m for m in settings.modes if m != "ddp")):
                        echo(f"[versus-ddp] {scenario} seed {seed}: {name}")
                        one = (run_ddp(settings, split, classes, seed, scenario, work, limits, name)
                               if name in DDP_RUNS else
                               run_paramhub(settings, name, split, classes, seed, scenario, work, limits))
                        score(one, held_out, settings.model, classes)
                        runs.append(one)
                        echo(f"[versus-ddp]   top-1 {one.rows[-1]['top1']:.3f} in {one.wall_s:.1f}s")
        except Skipped as exc:
            skipped[scenario] = str(exc)
    lines = summarise(runs, settings.target)
    return {"settings": dataclasses.asdict(settings), "cpu": cpu_model(), "lines": lines, "skipped": skipped,
            "runs": [{"scenario": r.scenario, "run": r.name, "seed": r.seed, "wall_s": r.wall_s, "rows": r.rows}
                     for r in runs], "workdir": str(work)}


def cpu_model() -> str:
    """lscpu's model name: every figure is recorded with the CPU it was measured on."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
