"""ps-worker: train one data shard against a parameter server.

Every option can also come from an environment variable named PARAMHUB_ plus the
option in upper case (``--server`` → ``PARAMHUB_SERVER``); a flag wins.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from paramhub.common.config import Timeouts, WorkerConfig
from paramhub.common.data import AUGMENTS
from paramhub.common.cliutil import pop_security, security_options
from paramhub.common.runtime import keep_freed_memory_resident, setup_logging

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


@click.command(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
@click.option("--server", default="127.0.0.1:50051", callback=_addresses,
              help="The server's host:port; for a partitioned server every partition's, comma-separated.")
@click.option("--shard", default=0, type=click.IntRange(min=0), help="Which data shard this worker trains.")
@click.option("--num-shards", default=None, type=click.IntRange(min=1), help="Shards in all (default: the server's --workers).")
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
@click.option("--threads", default=0, type=click.IntRange(min=0), help="Torch CPU threads (0: torch's default, all cores; use cores / workers when several share a machine).")
@click.option("--loader-workers", default=0, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--name", default="", help="Stable worker name (default shard-<i>).")
@click.option("--connect-timeout", default=60.0, type=click.FloatRange(min=0, min_open=True), help="Seconds to keep retrying an unreachable server.")
@click.option("--rpc-timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), help="Deadline of each small RPC.")
@click.option("--log-every", default=10, type=click.IntRange(min=0), help="Log the loss every N steps (0: never).")
@security_options
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(server, shard, num_shards, data, epochs, batch_size, image_size, augment, device, seed, synthetic_size,
         threads, loader_workers, name, connect_timeout, rpc_timeout, log_every, log_level, **security):
    """Train one data shard: pull the global model, compute, push, until the server says done."""
    setup_logging(log_level)
    keep_freed_memory_resident()
    if num_shards is not None and shard >= num_shards:
        raise click.BadParameter(f"must be below --num-shards ({num_shards})", param_hint="--shard")
    config = WorkerConfig(
        server=server, shard=shard, num_shards=num_shards, data=data, epochs=epochs, batch_size=batch_size, image_size=image_size,
        augment=augment, device=device, seed=seed, synthetic_size=synthetic_size, loader_workers=loader_workers,
        name=name, log_every=log_every,
        timeouts=dataclasses.replace(Timeouts(), connect=connect_timeout, rpc=rpc_timeout),
        security=pop_security(security),
    )
    if threads:
        import torch

        torch.set_num_threads(threads)  # several workers on one machine must not oversubscribe its cores
    from paramhub.common.data import DataError
    from paramhub.worker.client import PSClient, RunFailed, ServerUnreachable
    from paramhub.worker.partitions import PartitionedClient
    from paramhub.worker.trainer import Trainer

    import grpc

    from paramhub.common.security import SecurityError

    try:
        clients = [PSClient(a.strip(), config.timeouts, config.chunk_bytes, config.security) for a in server.split(",")]
        client = clients[0] if len(clients) == 1 else PartitionedClient(clients)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    with client:
        try:
            summary = Trainer(config, client).run()
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
    log.info("[worker %d] finished: %d steps, final version %d", shard, summary.steps, summary.final_version)
    sys.exit(0)


if __name__ == "__main__":
    main()
