"""ps-worker: train one data shard against a parameter server.

Every option can also come from an environment variable named PARAMHUB_ plus the
option in upper case (``--server`` → ``PARAMHUB_SERVER``), or from the ``[worker]`` (and
``[common]``) table of a ``--config`` TOML file. --shard, --num-shards and --server also
follow the variables that torchrun and Kubernetes Indexed Jobs set (``LauncherOption``).
Precedence: flag > PARAMHUB_* > launcher variables > config file > default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading

import click

from paramhub.common.config import Timeouts, WorkerConfig
from paramhub.common.data import AUGMENTS
from paramhub.common.cliutil import config_file_option, pop_security, security_options
from paramhub.common.runtime import LOG_FORMATS, configure_torch_threads, keep_freed_memory_resident, setup_logging

log = logging.getLogger("paramhub.worker")


def _address(ctx, param, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected host:port, got {value!r}")
    return value


def _addresses(ctx, param, value: str) -> str:
    """host:port, or a comma-separated list of them for a partitioned server."""
    for address in value.split(","):
        _address(ctx, param, address.strip())
    return value


class LauncherOption(click.Option):
    """An option that falls back on a variable a launcher sets when its PARAMHUB_* variable is unset.

    torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every process it starts,
    and a Kubernetes Indexed Job sets JOB_COMPLETION_INDEX in every pod, so a worker started
    by either needs no per-process flags. Click asks ``resolve_envvar_value`` after the
    command line and before the config file (``default_map``), which puts these variables
    exactly there: flag > PARAMHUB_* > launcher variables > config file > default.

    Args:
        launcher: reads the environment, returns the option's value as a string or None.
    """

    def __init__(self, *args, launcher, **kwargs):
        super().__init__(*args, **kwargs)
        self.launcher = launcher

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        return value if value is not None else self.launcher(os.environ)


def _launcher_shard(env) -> str | None:
    """torchrun's RANK, else an Indexed Job's JOB_COMPLETION_INDEX (RANK is the finer: one per process)."""
    return env.get("RANK") or env.get("JOB_COMPLETION_INDEX") or None


def _launcher_num_shards(env) -> str | None:
    return env.get("WORLD_SIZE") or None


def _launcher_server(env) -> str | None:
    """MASTER_ADDR:MASTER_PORT (the port defaults to ours, 50051); an IPv6 address gets brackets."""
    host = env.get("MASTER_ADDR")
    if not host:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{env.get('MASTER_PORT') or 50051}"


@click.command(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
@config_file_option("worker")
@click.option("--server", default="127.0.0.1:50051", callback=_addresses, cls=LauncherOption, launcher=_launcher_server,
              help="The server's host:port; for a partitioned server every partition's, comma-separated. "
                   "Else from MASTER_ADDR:MASTER_PORT (torchrun).")
@click.option("--failover", default="", help="The standby's host:port (ps-server --standby-for): the worker moves "
              "there when its server is gone or was replaced; for a partitioned server one per partition, "
              "comma-separated in --server's order.")
@click.option("--shard", default=0, type=click.IntRange(min=0), cls=LauncherOption, launcher=_launcher_shard,
              help="Which data shard this worker trains. Else from RANK (torchrun) or JOB_COMPLETION_INDEX "
                   "(Kubernetes Indexed Job).")
@click.option("--num-shards", default=None, type=click.IntRange(min=1), cls=LauncherOption,
              launcher=_launcher_num_shards,
              help="Shards in all (default: the server's --workers). Else from WORLD_SIZE (torchrun).")
@click.option("--data", default="synthetic",
              help="'synthetic'; an ImageFolder directory (split by --shard); one shard written by ps-data split; "
                   "or the directory holding all its shards (this worker takes shard --shard).")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Leave after this many passes over the shard (default: train until the server says done).")
@click.option("--batch-size", default=32, type=click.IntRange(min=1))
@click.option("--image-size", default=224, type=click.IntRange(min=8))
@click.option("--augment", default="auto", type=click.Choice(AUGMENTS), help="Training augmentation; auto follows --image-size.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=0, type=int, help="Data seed: the same on every worker.")
@click.option("--synthetic-size", default=4096, type=click.IntRange(min=1), help="Samples in the whole synthetic dataset.")
@click.option("--threads", default=0, type=click.IntRange(min=0), help="Torch CPU threads (0: auto: CPUs available ÷ local paramhub processes, re-checked while training; "
                   "OMP_NUM_THREADS, when set, wins over auto).")
@click.option("--overlap/--no-overlap", default=None,
              help="Async mode: push and prefetch the next pull while the next step computes, on weights one "
                   "exchange old.  [default: on when training on a GPU, off on the CPU]")
@click.option("--loader-workers", default=0, type=click.IntRange(min=0), help="DataLoader worker processes (not used under data leases: samples are read in the training process).")
@click.option("--sample-log", default=None, type=click.Path(dir_okay=False), help="Data leases: append one JSON line per push (its worker id, incarnation, sequence and the (epoch, sample) pairs it trained on) to this file.")
@click.option("--name", default="", help="Stable worker name (default shard-<i>): ASCII letters, digits and . _ - : @, at most 128.")
@click.option("--connect-timeout", default=60.0, type=click.FloatRange(min=0, min_open=True), help="Seconds to keep retrying an unreachable server.")
@click.option("--rpc-timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), help="Deadline of each small RPC.")
@click.option("--log-every", default=10, type=click.IntRange(min=0), help="Log the loss every N steps (0: never).")
@security_options
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="text", type=click.Choice(LOG_FORMATS), help="Plain lines, or JSON lines with structured event fields.")
def main(server, failover, shard, num_shards, data, epochs, batch_size, image_size, augment, device, seed,
         synthetic_size, threads, overlap, loader_workers, sample_log, name, connect_timeout, rpc_timeout,
         log_every, log_level, log_format, **security):
    """Train one data shard: pull the global model, compute, push, until the server says done.

    \b
    Each option's value comes from the first of:
      1. the flag on the command line;
      2. PARAMHUB_<FLAG> (--num-shards: PARAMHUB_NUM_SHARDS);
      3. for --shard, --num-shards, --server: the launcher's variables RANK or
         JOB_COMPLETION_INDEX, WORLD_SIZE, MASTER_ADDR:MASTER_PORT;
      4. the [worker] table, then the [common] table, of the --config file;
      5. the default.
    """
    setup_logging(log_level, log_format)
    keep_freed_memory_resident()
    if num_shards is not None and shard >= num_shards:
        raise click.BadParameter(f"must be below --num-shards ({num_shards})", param_hint="--shard")
    if failover:
        _addresses(None, None, failover)
        if len(failover.split(",")) != len(server.split(",")):
            raise click.BadParameter("give one standby per --server address", param_hint="--failover")
    config = WorkerConfig(
        server=server, failover=failover, shard=shard, num_shards=num_shards, data=data, epochs=epochs, batch_size=batch_size, image_size=image_size,
        augment=augment, device=device, seed=seed, synthetic_size=synthetic_size, loader_workers=loader_workers,
        name=name, log_every=log_every, overlap=overlap, sample_log=sample_log,
        timeouts=dataclasses.replace(Timeouts(), connect=connect_timeout, rpc=rpc_timeout),
        security=pop_security(security),
    )
    # several paramhub processes on one machine must not each take all its cores
    configure_torch_threads(threads, log, f"[worker {shard}] ", recheck=True)
    from paramhub.common.data import DataError
    from paramhub.worker.client import PSClient, RunFailed, ServerUnreachable
    from paramhub.worker.partitions import PartitionedClient
    from paramhub.worker.trainer import Trainer

    import grpc

    from paramhub.common.security import SecurityError

    try:
        standbys = [f.strip() for f in failover.split(",")] if failover else [""] * len(server.split(","))
        clients = [PSClient(a.strip(), config.timeouts, config.chunk_bytes, config.security, failover=f)
                   for a, f in zip(server.split(","), standbys)]
        client = clients[0] if len(clients) == 1 else PartitionedClient(clients)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    # SIGTERM (a Job scaled down, a pod evicted, docker stop): finish the step, leave, exit 143, so the
    # server gives this worker's leases to the others at once and a Job still counts the index as unfinished
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with client:
        try:
            summary = Trainer(config, client, stop).run()
        except ServerUnreachable as exc:
            log.error("[worker %d] %s", shard, exc)
            sys.exit(2)
        except (RunFailed, DataError) as exc:
            log.error("[worker %d] %s", shard, exc)
            sys.exit(1)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error("[worker %d] the server at %s refused us: %s", shard, server, exc.details())
            else:
                log.error("[worker %d] server refused a call: %s: %s", shard, exc.code().name, exc.details())
            sys.exit(1)
    if summary.stopped:
        log.info("[worker %d] stopped on SIGTERM after %d steps at version %d", shard, summary.steps,
                 summary.final_version)
        sys.exit(143)
    log.info("[worker %d] finished: %d steps, final version %d", shard, summary.steps, summary.final_version)
    sys.exit(0)


if __name__ == "__main__":
    main()
