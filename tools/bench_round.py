"""``ps-bench round`` and ``ps-bench aggregate``: a whole sync round, and the server's update math.

``round`` runs real processes: one parameter server (a ``PSServer`` child,
tools/bench_servers.py: sync, gradient mode, SGD with momentum 0.9, the model's
real layout) and N worker processes that each hold a ``PSClient``; and, for
comparison, N processes in a
gloo process group. One paramhub round: every worker pushes a fixed random
gradient based on the current version, the server averages the N pushes and
applies SGD, every worker pulls the new version. One gloo round: an
``all_reduce`` of an fp32 tensor of the model's size across the N processes.
Both kinds of rounds start from a barrier of their N processes and end when the
last process is done; timestamps are CLOCK_MONOTONIC, which all processes share.
The rounds alternate, so both see the same machine at the same moment.

``aggregate`` times, in this process, a sync round of the engine ps-server builds
(``ps.builder.build_engine``) fed N pushes that have already arrived (each added
to the sums, then the mean, the SGD step, publishing) against ``Tensor.copy_`` of
the same N pushes' bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import traceback

import click

from paramhub.tools import versus_ddp
from paramhub.tools.bench_servers import HOST, NUM_CLASSES, cpu_seconds, paramhub_server, proc_status_kb

STANDBY_GOAL_RATIO = 1.3  # the goal: a sync round with a standby at most 1.3x one without (4 workers, bf16)
ROUND_GOAL_RATIO = 2.0  # the goal: a sync round at most twice gloo's all_reduce (4 workers, bf16)
RSS_FIXED_MB = 300.0  # the server's memory budget: model bytes x (optimizer copies + 3) + 300 MB
START_TIMEOUT_S = 300.0  # N children each import torch (and join, or form the gloo group) on few cores
STEP_TIMEOUT_S = 300.0  # one round, even with 8 workers on 2 busy cores, takes seconds
IDLE_TIMEOUT_S = 900.0  # a child that hears nothing for this long gives up and exits
STOP_TIMEOUT_S = 10.0
GRADIENT_SCALE = 1e-3  # small enough that dozens of SGD steps keep the weights finite


# -- helpers -------------------------------------------------------------------------


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


# -- child processes -----------------------------------------------------------------


def _child_loop(conn, barrier, handlers: dict) -> None:
    """Serves commands from the parent until "stop", EOF (the parent died) or a long silence.

    Every command but "stop" waits on the group's barrier, so the N children start
    together, then runs its handler and answers ("ok", start, end, handler's result).
    Any failure is answered as ("error", traceback) and ends the child.
    """
    try:
        while conn.poll(IDLE_TIMEOUT_S):
            command = conn.recv()
            if command == "stop":
                return
            barrier.wait(timeout=STEP_TIMEOUT_S)
            start = time.monotonic()
            result = handlers[command]()
            conn.send(("ok", start, time.monotonic(), result))
    except EOFError:
        return
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        barrier.abort()  # release peers stuck at the barrier: they answer an error instead of hanging


def paramhub_worker(rank: int, conn, barrier, address: str) -> None:
    """Child: a PSClient that pushes a fixed random gradient and pulls the next version on command.

    Commands: "round" (push, then wait for and pull the next version), and the two
    halves "push" and "pull" (for the per-phase CPU figures).
    """
    try:
        import torch

        from paramhub.common.config import Timeouts
        from paramhub.common.pb import paramhub_pb2 as pb
        from paramhub.common.runtime import keep_freed_memory_resident
        from paramhub.worker.client import PSClient

        keep_freed_memory_resident()  # as ps-worker does
        torch.set_num_threads(1)  # N workers share few cores; more threads only contend
        client = PSClient(address, Timeouts(rpc=30, transfer=STEP_TIMEOUT_S, connect=60, pull_wait=30))
        info = client.join(name=f"bench-{rank}")
        layout = info.layout
        generator = torch.Generator().manual_seed(rank)
        gradient = [torch.randn(r.numel, generator=generator).mul_(GRADIENT_SCALE).to(r.dtype)
                    if r.dtype.is_floating_point else torch.zeros(r.numel, dtype=r.dtype) for r in layout.regions]
        pulled = layout.empty_regions()
        state = {"version": info.version}
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        barrier.abort()
        return

    def push() -> int:
        reply = client.push(pb.PUSH_KIND_GRADIENT, state["version"], gradient, num_samples=1, loss=0.0)
        if reply.outcome != pb.PUSH_OUTCOME_ACCEPTED:
            raise RuntimeError(f"push for version {state['version']}: {pb.PushOutcome.Name(reply.outcome)}")
        return reply.next_version

    def pull() -> int:
        header = client.wait_and_pull(pulled, state["version"] + 1)
        state["version"] = header.version
        return header.version

    conn.send(("ready", os.getpid(), layout.nbytes, info.wire_layout.nbytes, layout.hash))
    try:
        _child_loop(conn, barrier, {"round": lambda: (push(), pull())[1], "push": push, "pull": pull})
    finally:
        client.close()


def gloo_rank(rank: int, conn, barrier, world_size: int, store_path: str, numel: int) -> None:
    """Child: one rank of a gloo group that all-reduces an fp32 tensor of ``numel`` on command."""
    try:
        import torch
        import torch.distributed as dist

        # Loopback, like the parameter server; gloo otherwise picks the interface of the host name.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        dist.all_reduce(tensor)  # the first collective connects the ranks: not part of any round
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        barrier.abort()
        return

    def all_reduce() -> int:
        dist.all_reduce(tensor)  # the sums grow N-fold a round; float adds take the same time at any size
        return 0

    conn.send(("ready", os.getpid()))
    try:
        _child_loop(conn, barrier, {"round": all_reduce})
    finally:
        dist.destroy_process_group()


class ChildGroup:
    """N spawned children with a pipe each and a shared barrier; every wait bounded; always stopped.

    Args:
        name: for error messages.
        target: the child function, called as ``target(rank, conn, barrier, *args)``.
        n: how many children.
        args: the rest of the target's arguments (the same for every rank).
    """

    def __init__(self, name: str, target, n: int, args: tuple = ()):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or tensors
        self.name = name
        self.barrier = ctx.Barrier(n)
        self.conns = []
        self.procs = []
        self.ready: list[tuple] = []
        try:
            for rank in range(n):
                parent_end, child_end = ctx.Pipe()
                # daemon: multiprocessing terminates the children if the parent exits without stop().
                proc = ctx.Process(target=target, args=(rank, child_end, self.barrier, *args), daemon=True,
                                   name=f"{name}-{rank}")
                proc.start()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(proc)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> list[tuple]:
        """Waits for every child's ("ready", ...) message; returns them in rank order."""
        self.ready = [reply[1:] for reply in self._gather(timeout, "ready")]
        return self.ready

    def run(self, command: str, timeout: float = STEP_TIMEOUT_S) -> tuple[float, list]:
        """Sends one command to all; returns (last end − first start, the children's results)."""
        for conn in self.conns:
            conn.send(command)
        replies = self._gather(timeout, "ok")
        return max(r[2] for r in replies) - min(r[1] for r in replies), [r[3] for r in replies]

    def _gather(self, timeout: float, expected: str) -> list[tuple]:
        deadline = time.monotonic() + timeout
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise click.ClickException(f"{self.name} {rank}: no answer within {timeout:.0f}s")
            try:
                reply = conn.recv()
            except EOFError:
                raise click.ClickException(f"{self.name} {rank} exited (code {self.procs[rank].exitcode})") from None
            if reply[0] != expected:
                raise click.ClickException(f"{self.name} {rank} failed:\n{reply[1]}")
            replies.append(reply)
        return replies

    def cpu_seconds(self) -> float:
        """CPU time of all children so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        """Asks each child to stop, then terminates and kills, each wait bounded."""
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send("stop")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for escalate in ("terminate", "kill"):
            alive = [p for p in self.procs if p.is_alive()]
            for proc in alive:
                getattr(proc, escalate)()
            for proc in alive:
                proc.join(STOP_TIMEOUT_S)
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> "ChildGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- ps-bench round ------------------------------------------------------------------


def _wait_attached(address: str, timeout: float = START_TIMEOUT_S) -> None:
    """Waits (bounded) until the primary at ``address`` reports its standby attached."""
    from paramhub.common.config import Timeouts
    from paramhub.worker.client import PSClient

    deadline = time.monotonic() + timeout
    with PSClient(address, Timeouts(rpc=10, connect=30)) as client:
        while client.status().standby_state != "attached":
            if time.monotonic() > deadline:
                raise click.ClickException(f"no standby attached to {address} within {timeout:.0f}s")
            time.sleep(0.1)


def run_round(model_name: str, workers: int, wire_dtype: str, repeats: int, warmup: int, split_rounds: int,
              standby: bool = False, replicate_in_wire_dtype: bool = False) -> dict:
    """The interleaved paramhub and gloo rounds; returns the figures as a dict.

    With ``standby`` a second server with a standby (ps-server --standby-for) and its own N
    workers run the same rounds, interleaved with the others, for the cost of replication;
    ``replicate_in_wire_dtype`` gives both servers (and the standby) that flag.

    Raises:
        click.ClickException: a child did not start, failed, or a round went wrong.
    """
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="paramhub-bench-round-"))
    rss_file = workdir / "server-rss.json"
    try:
        with contextlib.ExitStack() as stack:  # unwinds in reverse: the groups stop before the server
            server = stack.enter_context(paramhub_server(model_name, workers=workers, wire_dtype=wire_dtype,
                                                         rss_file=str(rss_file),
                                                         replicate_in_wire_dtype=replicate_in_wire_dtype))
            address = f"{HOST}:{server.wait_ready()}"
            ps_group = stack.enter_context(ChildGroup("paramhub worker", paramhub_worker, workers, (address,)))
            ready = ps_group.wait_ready()
            if len({r[3] for r in ready}) != 1:
                raise click.ClickException("workers joined with different layouts")
            _, nbytes, wire_nbytes, _ = ready[0]
            numel = nbytes // 4  # an fp32 tensor of the model's full size
            gloo_group = stack.enter_context(ChildGroup(
                "gloo rank", gloo_rank, workers, (workers, str(workdir / "gloo-store"), numel)))
            gloo_group.wait_ready()
            protected_group = None
            if standby:
                narrow = {"replicate_in_wire_dtype": replicate_in_wire_dtype}
                protected = stack.enter_context(paramhub_server(model_name, workers=workers, wire_dtype=wire_dtype,
                                                                **narrow))
                protected_address = f"{HOST}:{protected.wait_ready()}"
                follower = stack.enter_context(paramhub_server(model_name, workers=workers, wire_dtype=wire_dtype,
                                                               standby_for=protected_address, **narrow))
                follower.wait_ready()
                _wait_attached(protected_address)
                protected_group = stack.enter_context(ChildGroup("paramhub worker (with standby)", paramhub_worker,
                                                                 workers, (protected_address,)))
                protected_group.wait_ready()

            expected = {"version": 0, "protected": 0}

            def paramhub_round(command: str = "round") -> float:
                seconds, versions = ps_group.run(command)
                expected["version"] += 1
                if set(versions) != {expected["version"]}:
                    raise click.ClickException(f"expected every worker at version {expected['version']}, "
                                               f"got {versions}")
                return seconds

            def protected_round() -> float:
                seconds, versions = protected_group.run("round")
                expected["protected"] += 1
                if set(versions) != {expected["protected"]}:
                    raise click.ClickException(f"expected every worker at version {expected['protected']}, got "
                                               f"{versions} (with a standby)")
                return seconds

            def gloo_round() -> float:
                return gloo_group.run("round")[0]

            for _ in range(warmup):
                paramhub_round()
                gloo_round()
                if standby:
                    protected_round()

            # The server is idle between rounds, so CPU sampled there belongs to the rounds.
            server_cpu = worker_cpu = 0.0
            round_s: list[float] = []
            gloo_s: list[float] = []
            standby_s: list[float] = []
            for i in range(repeats):
                if standby and i % 2:
                    standby_s.append(protected_round())
                if i % 2:
                    gloo_s.append(gloo_round())
                cpu_before, workers_before = cpu_seconds(server.proc.pid), ps_group.cpu_seconds()
                round_s.append(paramhub_round())
                server_cpu += cpu_seconds(server.proc.pid) - cpu_before
                worker_cpu += ps_group.cpu_seconds() - workers_before
                if not i % 2:
                    gloo_s.append(gloo_round())
                if standby and not i % 2:
                    standby_s.append(protected_round())

            # Split rounds: all pushes, then all pulls, for the server's CPU per byte of each phase.
            push_cpu = pull_cpu = push_wall = pull_wall = 0.0
            for _ in range(split_rounds):
                before = cpu_seconds(server.proc.pid)
                push_wall += ps_group.run("push")[0]
                middle = cpu_seconds(server.proc.pid)
                pull_wall += paramhub_round("pull")
                push_cpu += middle - before
                pull_cpu += cpu_seconds(server.proc.pid) - middle

            peak_kb = proc_status_kb(server.proc.pid, "VmHWM")
        server_rss = json.loads(rss_file.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    mb = 1024 / 1e6  # /proc's kB are KiB; figures are in MB (1e6 bytes) like the budget above
    moved = workers * wire_nbytes  # payload bytes in each direction of a round, at the server
    split = max(1, split_rounds)
    paired = {} if not standby else {
        "standby_round_s": statistics.median(standby_s),
        "standby_ratio": _median_ratio(standby_s, round_s),
        "standby_goal_ratio": STANDBY_GOAL_RATIO,
        "standby_samples_s": standby_s,
        "standby_pair_ratios": [p / r for p, r in zip(standby_s, round_s)],
        # the averaged update: in the model's dtypes (fp32), or its PARAM regions in the wire dtype
        "replication_bytes_per_round": wire_nbytes if replicate_in_wire_dtype else nbytes,
        "replicate_in_wire_dtype": replicate_in_wire_dtype,
    }
    return {
        **paired,
        "cpu_model": versus_ddp.cpu_model(),
        "ratio": _median_ratio(round_s, gloo_s),
        "round_s": statistics.median(round_s),
        "gloo_s": statistics.median(gloo_s),
        "goal_ratio": ROUND_GOAL_RATIO,
        "model": model_name,
        "workers": workers,
        "wire_dtype": wire_dtype,
        "bytes": nbytes,
        "wire_bytes": wire_nbytes,
        "repeats": repeats,
        "warmup": warmup,
        "cpus": os.cpu_count(),
        "round_samples_s": round_s,
        "gloo_samples_s": gloo_s,
        "pair_ratios": [p / g for p, g in zip(round_s, gloo_s)],
        "server_peak_rss_mb": peak_kb * mb,
        "server_runtime_rss_mb": server_rss["runtime_kb"] * mb,
        "server_ready_rss_mb": server_rss["ready_kb"] * mb,
        "rss_budget_mb": nbytes * (1 + 3) / 1e6 + RSS_FIXED_MB,  # SGD with momentum: one optimizer copy
        "server_cpu_s_per_round": server_cpu / repeats,
        "worker_cpu_s_per_round": worker_cpu / repeats / workers,
        "split_rounds": split_rounds,
        "push_phase_s": push_wall / split,
        "pull_phase_s": pull_wall / split,
        "server_push_cpu_ns_per_wire_byte": push_cpu / split / moved * 1e9 if split_rounds else None,
        "server_pull_cpu_ns_per_wire_byte": pull_cpu / split / moved * 1e9 if split_rounds else None,
    }


def format_round(r: dict) -> str:
    """The round report as text."""
    verdict = "meets" if r["ratio"] <= r["goal_ratio"] else "misses"
    lines = [
        f"round: {r['model']}, {r['workers']} workers, wire {r['wire_dtype']} ({r['wire_bytes'] / 1e6:.1f} MB each way "
        f"per worker), gloo all_reduce of {r['bytes'] / 1e6:.1f} MB fp32, {r['repeats']} interleaved repeats after "
        f"{r['warmup']} warm-up, {r['cpus']} CPUs, loopback",
        f"  paramhub push+SGD+pull  median {r['round_s'] * 1e3:8.1f} ms",
        f"  gloo all_reduce         median {r['gloo_s'] * 1e3:8.1f} ms",
        f"  ratio {r['ratio']:.2f}x gloo ({verdict} the goal of at most {r['goal_ratio']:g}x; "
        f"per-pair {min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f}x)",
        f"  server peak RSS {r['server_peak_rss_mb']:.0f} MB (budget {r['rss_budget_mb']:.0f} MB; "
        f"{r['server_runtime_rss_mb']:.0f} MB after imports, {r['server_ready_rss_mb']:.0f} MB when ready)",
        f"  CPU per round: server {r['server_cpu_s_per_round']:.2f} s, each worker {r['worker_cpu_s_per_round']:.2f} s",
    ]
    if "standby_ratio" in r:
        verdict = "meets" if r["standby_ratio"] <= r["standby_goal_ratio"] else "misses"
        lines.append(
            f"  with a standby (--standby-for, {r['replication_bytes_per_round'] / 1e6:.1f} MB replicated a round): "
            f"median {r['standby_round_s'] * 1e3:.1f} ms, {r['standby_ratio']:.2f}x the round without ({verdict} "
            f"the goal of at most {r['standby_goal_ratio']:g}x; per-pair "
            f"{min(r['standby_pair_ratios']):.2f}-{max(r['standby_pair_ratios']):.2f}x)")
    lines.append(f"  CPU: {r['cpu_model']}")
    if r["split_rounds"]:
        lines.append(
            f"  split rounds: push phase {r['push_phase_s'] * 1e3:.0f} ms, server "
            f"{r['server_push_cpu_ns_per_wire_byte']:.2f} CPU ns per byte received; pull phase "
            f"{r['pull_phase_s'] * 1e3:.0f} ms, {r['server_pull_cpu_ns_per_wire_byte']:.2f} CPU ns per byte sent")
    return "\n".join(lines)


# -- ps-bench aggregate --------------------------------------------------------------


def run_aggregate(model_name: str, workers: int, repeats: int, warmup: int, wire_dtype: str = "fp32") -> dict:
    """Times the engine's update on N pushes against copying the same bytes; returns the figures.

    One aggregate is a sync round of the engine ps-server builds for ``--mode sync
    --update grad --momentum 0.9 --workers N`` (``SyncRounds`` over a
    ``ParameterStore``, SGD) fed N already-received pushes in the wire dtype: the
    pushes are added to the mean in place and the last one closes the round (mean,
    SGD step, publish). One copy: ``copy_`` of each push into one preallocated set
    of regions, so both read the same N × wire bytes.
    """
    import torch

    from paramhub.common import codec
    from paramhub.common.config import ServerConfig
    from paramhub.common.layout import Layout
    from paramhub.common.models import build_model
    from paramhub.ps.builder import build_engine
    from paramhub.ps.consistency import StagedPush
    from paramhub.ps.registry import WorkerRegistry
    from paramhub.ps.store import ParameterStore

    model = build_model(model_name, NUM_CLASSES)
    layout = Layout.from_model(model)
    store = ParameterStore(layout, layout.flatten(model.state_dict()))
    del model
    wire_layout = layout.on_wire(codec.WIRE_DTYPES[wire_dtype])
    generator = torch.Generator().manual_seed(0)
    pushes = [[torch.randn(r.numel, generator=generator).mul_(GRADIENT_SCALE).to(r.dtype)
               if r.dtype.is_floating_point else torch.zeros(r.numel, dtype=r.dtype) for r in wire_layout.regions]
              for _ in range(workers)]
    registry = WorkerRegistry(lease_timeout=3600.0)
    ids = [registry.join(f"bench-{i}", 1, False, i).worker_id for i in range(workers)]
    config = ServerConfig(model=model_name, num_classes=NUM_CLASSES, workers=workers, mode="sync", update="grad",
                          lr=0.1, momentum=0.9)
    engine = build_engine(config, store, registry)
    copies = wire_layout.empty_regions()

    def aggregate_round() -> float:
        version = store.version
        start = time.perf_counter()
        for worker_id, push in zip(ids, pushes):
            engine.submit(StagedPush(worker_id, 1, version + 1, version, 1, 0.0,
                                     codec.whole_regions(push)))
        elapsed = time.perf_counter() - start
        if store.version != version + 1:
            raise click.ClickException(f"the round did not close (version {store.version})")
        return elapsed

    def copy_round() -> float:
        start = time.perf_counter()
        for push in pushes:
            for dst, src in zip(copies, push):
                dst.copy_(src)
        return time.perf_counter() - start

    for _ in range(warmup):
        aggregate_round()
        copy_round()
    aggregate_s: list[float] = []
    copy_s: list[float] = []
    for i in range(repeats):  # alternate which goes first
        if i % 2:
            copy_s.append(copy_round())
        aggregate_s.append(aggregate_round())
        if not i % 2:
            copy_s.append(copy_round())
    if not all(codec.finite(r) for r in store.snapshot().regions):
        raise click.ClickException("the aggregated weights are not finite")

    read = workers * wire_layout.nbytes
    return {
        "ratio": _median_ratio(aggregate_s, copy_s),
        "aggregate_s": statistics.median(aggregate_s),
        "copy_s": statistics.median(copy_s),
        "model": model_name,
        "workers": workers,
        "wire_dtype": wire_dtype,
        "bytes": wire_layout.nbytes,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "aggregate_ns_per_byte": statistics.median(aggregate_s) / read * 1e9,
        "copy_ns_per_byte": statistics.median(copy_s) / read * 1e9,
        "aggregate_samples_s": aggregate_s,
        "copy_samples_s": copy_s,
        "pair_ratios": [a / c for a, c in zip(aggregate_s, copy_s)],
    }


def format_aggregate(r: dict) -> str:
    """The aggregate report as text."""
    read = r["workers"] * r["bytes"]
    return "\n".join([
        f"aggregate: {r['model']}, {r['workers']} {r['wire_dtype']} pushes of {r['bytes'] / 1e6:.1f} MB, "
        f"{r['repeats']} interleaved "
        f"repeats after {r['warmup']} warm-up, {r['threads']} torch threads, {r['cpus']} CPUs",
        f"  mean + SGD (momentum)   median {r['aggregate_s'] * 1e3:8.1f} ms  ({read / r['aggregate_s'] / 1e9:.2f} GB/s "
        f"of pushes, {r['aggregate_ns_per_byte']:.3f} ns per byte)",
        f"  copy_ of the same bytes median {r['copy_s'] * 1e3:8.1f} ms  ({read / r['copy_s'] / 1e9:.2f} GB/s, "
        f"{r['copy_ns_per_byte']:.3f} ns per byte)",
        f"  ratio {r['ratio']:.2f}x the copy (per-pair {min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f}x)",
    ])
