"""Click options shared by several console scripts."""

from __future__ import annotations

import click

from paramhub.common.security import Security


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
