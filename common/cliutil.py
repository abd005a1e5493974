"""Click options shared by several console scripts.

Every console script takes each flag from, in order of precedence: the command line, an
environment variable ``PARAMHUB_<FLAG>`` (click's ``auto_envvar_prefix``), a TOML file given
with ``--config`` (``config_file_option``), and last the flag's default.
"""

from __future__ import annotations

import datetime
import importlib
import pathlib
import typing

import click

from paramhub.common.security import Security

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is new in 3.11
    tomllib = None

# The config file's tables: [common] applies to every program, each other table to one program.
COMMON_SECTION = "common"
# Section → the console script that reads it and its click command (module:attribute). Checking
# a [common] key needs every program's flags; the modules are imported by name, and only then,
# so that common/ does not depend on ps/ or worker/ when it is imported.
CONFIG_SECTIONS = {
    "server": ("ps-server", "paramhub.ps.cli:main"),
    "worker": ("ps-worker", "paramhub.worker.cli:main"),
    "eval": ("ps-eval", "paramhub.worker.eval_cli:main"),
    "data": ("ps-data", "paramhub.tools.data:main"),
    "ctl": ("ps-ctl", "paramhub.tools.ctl:main"),
}


def security_options(command):
    """Adds --tls-cert/--tls-key/--tls-ca/--token (each also from PARAMHUB_* env vars)."""
    options = [
        click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                     help="PEM certificate of this process (TLS)."),
        click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                     help="PEM private key of --tls-cert."),
        click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                     help="PEM CA: the server requires client certificates signed by it; clients verify the server with it."),
        click.option("--token", default=None,
                     help="Shared secret checked on every RPC (better from PARAMHUB_TOKEN: flags show in `ps`)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_security(options: dict) -> Security:
    """Removes the security options from a click options dict and returns them as a Security."""
    return Security(tls_cert=options.pop("tls_cert"), tls_key=options.pop("tls_key"), tls_ca=options.pop("tls_ca"),
                    token=options.pop("token"))


def config_file_option(section: str):
    """Adds ``--config FILE``: defaults for the command's flags from a TOML file.

    The file's ``[common]`` table applies to every program, its ``[section]`` table (winning
    over ``[common]``) to this one. Keys are flag names, with dashes or underscores
    (``num-shards`` or ``num_shards``). The values become the command's ``default_map``, which
    click consults after the command line and the environment variables, so the precedence is
    flag > ``PARAMHUB_<FLAG>`` > file > default. The option is eager: it is processed before
    every other option, while their values are still to be looked up.

    Args:
        section: this program's table, one of ``CONFIG_SECTIONS``.
    """
    assert section in CONFIG_SECTIONS, section

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or ctx.resilient_parsing:
            return value
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value, section, ctx.command)}
        return value

    return click.option(
        "--config", default=None, metavar="FILE", is_eager=True, expose_value=False, callback=load,
        help=f"TOML file of flag defaults: its [{COMMON_SECTION}] and [{section}] tables, keys are flag names. "
             "A flag on the command line, then a PARAMHUB_* variable, wins over the file.")


def read_config(path: str | pathlib.Path, section: str, command: click.Command) -> dict:
    """The defaults a config file gives ``command``: parameter name → value.

    A ``[common]`` key that this program lacks but another one has is skipped (``server``
    means nothing to ps-server); any other key that no flag has is an error, so a typo is
    never silently ignored.

    Raises:
        click.BadParameter: the file is missing, unreadable or not TOML; it has an unknown
            table or key, a key twice, or a value that is no string, number or boolean.
    """
    if tomllib is None:
        raise click.BadParameter("reading a config file needs Python 3.11 or later (tomllib)", param_hint="--config")
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", param_hint="--config") from None

    def fail(message: str) -> typing.NoReturn:
        raise click.BadParameter(f"{path}: {message}", param_hint="--config")

    tables = [COMMON_SECTION, *CONFIG_SECTIONS]
    for name, table in document.items():
        if not isinstance(table, dict):
            fail(f"{name!r} is outside any table; put it under one of " + ", ".join(f"[{t}]" for t in tables))
        if name not in tables:
            fail(f"unknown table [{name}]; the tables are " + ", ".join(f"[{t}]" for t in tables))
    own = flag_keys(command)
    values = {}
    for table in (COMMON_SECTION, section):
        seen = {}
        for key, value in document.get(table, {}).items():
            normal = key.replace("-", "_")
            if normal in seen:
                fail(f"[{table}] sets {key!r} twice (also as {seen[normal]!r})")
            seen[normal] = key
            if normal == "config":
                fail(f"[{table}] {key}: a config file cannot name another one")
            if normal not in own:
                others = set().union(*map(section_keys, CONFIG_SECTIONS)) if table == COMMON_SECTION \
                    else section_keys(section)
                if normal in others:
                    continue  # another program's flag (or another subcommand's)
                who = ("no paramhub program has a" if table == COMMON_SECTION
                       else f"{CONFIG_SECTIONS[section][0]} has no")
                fail(f"unknown key {key!r} in [{table}]: {who} flag --{normal.replace('_', '-')}")
            if isinstance(value, (dict, list, datetime.date, datetime.time)):
                fail(f"[{table}] {key} must be a string, a number or a boolean")
            values[own[normal]] = value
    return values


def flag_keys(command: click.Command) -> dict[str, str]:
    """Config keys of a command's options (long flag names, underscored) → parameter names."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "config" and not param.hidden:
            for opt in param.opts:
                if opt.startswith("--"):
                    keys[opt[2:].replace("-", "_")] = param.name
    return keys


def section_keys(section: str) -> set[str]:
    """Every config key that the program of ``section`` knows (for a group: any subcommand's)."""
    module, _, attribute = CONFIG_SECTIONS[section][1].partition(":")
    command = getattr(importlib.import_module(module), attribute)
    commands = list(command.commands.values()) if isinstance(command, click.Group) else [command]
    return {key for sub in commands for key in flag_keys(sub)}
