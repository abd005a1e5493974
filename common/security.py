"""TLS credentials and the shared-token check, for both ends.

Mutual TLS: the server presents its certificate and, given a CA, requires every
client to present one signed by that CA. The token: a shared secret sent as
``authorization: Bearer <token>`` metadata on every RPC and compared in constant
time; the standard health service is exempt so probes need no secret.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import ipaddress
import pathlib
import socket

import grpc

TOKEN_HEADER = "authorization"
# Health checks carry no data worth protecting, and probes (Kubernetes, compose) cannot send a token.
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)


class SecurityError(ValueError):
    """Unusable security settings (a missing file, TLS half configured, an unsafe listen address)."""


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    file = pathlib.Path(path)
    if not file.is_file():
        raise SecurityError(f"{what} file {file} does not exist")
    return file.read_bytes()


@dataclasses.dataclass(frozen=True)
class Security:
    """What one side needs: TLS files (PEM) and/or the shared token."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the server (None: plaintext); with a CA, clients must present certificates."""
        if not self.tls:
            return None
        if not (self.tls_cert and self.tls_key):
            raise SecurityError("the server needs both --tls-cert and --tls-key")
        ca = _read(self.tls_ca, "--tls-ca")
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key, "--tls-key"), _read(self.tls_cert, "--tls-cert"))],
            root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for a client (None: plaintext)."""
        if not self.tls:
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"), private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"))

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        """The token check, when a token is set."""
        return [TokenCheck(self.token)] if self.token else []

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every client call carries."""
        return ((TOKEN_HEADER, f"Bearer {self.token}"),) if self.token else ()


def _unauthenticated(message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # The handler kind must match the method's; the generic stream-stream one would not
    # parse a unary request, but abort() runs before any request is read.
    return grpc.stream_stream_rpc_method_handler(abort)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every RPC (but health checks) whose bearer token is not the shared one."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(UNAUTHENTICATED_METHODS):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return continuation(handler_call_details)
        reason = "missing" if not sent else "wrong"
        return _unauthenticated(f"{reason} token: set --token or PARAMHUB_TOKEN to the server's token")


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the token) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details):
        return _Details(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                        details.credentials, details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                    "wait_for_ready", "compression")), grpc.ClientCallDetails):
    """Call details with our metadata added (gRPC's own type is private)."""


def secure_channel(address: str, security: Security, options: list) -> grpc.Channel:
    """A channel to ``address`` with TLS and the token as configured."""
    credentials = security.channel_credentials()
    channel = (grpc.secure_channel(address, credentials, options=options) if credentials
               else grpc.insecure_channel(address, options=options))
    metadata = security.call_metadata()
    return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_listen_address(host: str, security: Security, insecure: bool) -> None:
    """Refuses to expose an unprotected server beyond this machine.

    Raises:
        SecurityError: a non-loopback address with neither TLS nor a token, without ``insecure``.
    """
    if is_loopback(host) or security.tls or security.token or insecure:
        return
    raise SecurityError(
        f"refusing to listen on {host} with neither TLS (--tls-cert/--tls-key) nor a token (--token); "
        "anyone who can reach it could change the model. Pass --insecure to do it anyway.")
