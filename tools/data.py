"""ps-data: prepare data for ps-worker and ps-eval.

    ps-data split --input /data/imagenet/train --shards 8 --out /data/shards --val-fraction 0.01
    ps-worker --shard 3 --data /data/shards ...      # takes /data/shards/shard-00003
    ps-data verify /data/shards                       # checks every file against its manifest

The work is done by ``paramhub.common.shards``; this module only turns flags into a call
and errors into clear messages.
"""

from __future__ import annotations

import pathlib

import click

from paramhub.common.cliutil import config_file_option
from paramhub.common.shards import DataError, split_dataset, verify_split

# Each subcommand reads PARAMHUB_<FLAG>, like every console script. The prefix is set on the
# subcommands: on the group, click would prefix a subcommand's variables with its name too
# (PARAMHUB_SPLIT_SEED).
ENV = {"auto_envvar_prefix": "PARAMHUB"}


@click.group(context_settings={"show_default": True})
def main():
    """Prepare data for paramhub: split a dataset into per-worker shards, check a split."""


@main.command(context_settings=ENV)
@config_file_option("data")
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=pathlib.Path), envvar="PARAMHUB_INPUT",
              allow_from_autoenv=False,
              help="An ImageFolder tree (one sub-directory of images per class) or CIFAR-10's cifar-10-batches-py.")
@click.option("--shards", "num_shards", required=True, type=click.IntRange(min=1), envvar="PARAMHUB_SHARDS",
              allow_from_autoenv=False,
              help="How many shards (one per worker).")
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Directory to create: out/shard-00000 ..., out/val, out/manifest.json.")
@click.option("--seed", default=0, type=click.IntRange(0, 2**32 - 1), help="Seed of the shuffle; same seed, same split.")
@click.option("--val-fraction", default=0.0, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class held out in out/val (at least one image per class when above 0).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--copy", is_flag=True,
              help="Copy ImageFolder images instead of hard-linking them (a hard link shares the file's contents).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Parallel reads/writes (default: automatic).")
def split(input_dir, num_shards, out, seed, val_fraction, force, copy, threads):
    """Split a dataset into shard directories, randomly, reproducibly and stratified by class.

    Every image is decoded first; any bad input stops the split before anything is
    written, and the output appears under --out only once it is complete.
    """
    try:
        manifest = split_dataset(input_dir, out, num_shards, seed=seed, val_fraction=val_fraction, force=force,
                                 copy=copy, threads=threads, progress=True)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    sizes = [s["images"] for s in manifest["shards"]]
    click.echo(f"{manifest['source']['type']} {input_dir}: {len(manifest['classes'])} classes; "
               f"{num_shards} shards of {min(sizes)}..{max(sizes)} images in {out}")
    if manifest["val"]:
        click.echo(f"held out {manifest['val']['images']} images in {out / manifest['val']['path']}")


@main.command()
@click.argument("directory", type=click.Path(path_type=pathlib.Path))
def verify(directory):
    """Check every file of a split (or of one shard) against the sha256 in its manifest."""
    try:
        problems = verify_split(directory)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    for line in problems[:50]:
        click.echo(line, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {directory}")
    click.echo(f"{directory}: every file matches its manifest")


if __name__ == "__main__":
    main()
