"""Mutual TLS, the shared token, and the refusal to expose an unprotected server."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
import torch

from conftest import fast_timeouts
from paramhub.common import codec
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc
from paramhub.common.security import Security, SecurityError, check_listen_address
from paramhub.tools.cluster import LocalCluster
from paramhub.worker.client import PSClient, ServerUnreachable

pytestmark = pytest.mark.timeout(120)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, san: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(path, key, cert):
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server and a client certificate it signed, and a client certificate from a rogue CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("paramhub test CA", None, None, ca=True)
    _write(d / "ca", ca_key, ca_cert)
    server = _write(d / "server", *_issue("localhost", ca_key, ca_cert.subject, ca=False, san=True))
    client = _write(d / "client", *_issue("worker", ca_key, ca_cert.subject, ca=False))
    rogue_key, rogue_cert = _issue("rogue CA", None, None, ca=True)
    rogue = _write(d / "rogue", *_issue("intruder", rogue_key, rogue_cert.subject, ca=False))
    return {"ca": str(d / "ca.crt"), "server": server, "client": client, "rogue": rogue}


def _every_rpc(channel, info, metadata) -> dict:
    """Calls each of the six RPCs once with ``metadata``; each is a call that changes the server if let through.

    Returns the RpcError each raised (or None when it succeeded).
    """
    stub = pb_grpc.ParameterServerStub(channel)
    worker = dict(worker_id=info.worker_id, incarnation=info.incarnation)
    push = [pb.PushMessage(header=pb.PushHeader(**worker, sequence=1, base_version=0, kind=pb.PUSH_KIND_GRADIENT,
                                                layout_hash=info.layout.hash, num_samples=1, loss=0.0))]
    push += [pb.PushMessage.FromString(m) for m in codec.encoded_chunks(
        info.layout, [torch.ones(info.layout.regions[0].numel)])]
    calls = {
        "Join": lambda: stub.Join(pb.JoinRequest(worker_name="intruder", incarnation=1), metadata=metadata, timeout=5),
        "Pull": lambda: list(stub.Pull(pb.PullRequest(worker_id=info.worker_id), metadata=metadata, timeout=5)),
        "Push": lambda: stub.Push(iter(push), metadata=metadata, timeout=5),
        "Heartbeat": lambda: stub.Heartbeat(pb.HeartbeatRequest(**worker), metadata=metadata, timeout=5),
        "Status": lambda: stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5),
        "Leave": lambda: stub.Leave(pb.LeaveRequest(**worker), metadata=metadata, timeout=5),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except grpc.RpcError as err:
            errors[name] = err
    return errors


def test_the_token_is_checked_on_every_call_but_health(start_server):
    server = start_server(security=Security(token="s3cret"))
    with PSClient(f"127.0.0.1:{server.port}", fast_timeouts(), security=Security(token="s3cret")) as good:
        info = good.join("w")
        with server.store.reading() as snap:
            weights = snap.regions[0].clone()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for metadata, reason in (((), "missing token"), ((("authorization", "Bearer guess"),), "wrong token"),
                                     ((("authorization", "s3cret"),), "wrong token")):  # not as a bearer token
                errors = _every_rpc(channel, info, metadata)
                assert set(errors) == {"Join", "Pull", "Push", "Heartbeat", "Leave", "Status"}
                for name, err in errors.items():
                    assert err is not None, f"{name} answered without the token"
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and reason in err.details(), name
                # Nothing changed: no update, no new worker, the worker did not leave.
                assert server.store.version == 0 and torch.equal(server.store.snapshot().regions[0], weights)
                assert [(r.name, r.alive) for r in server.registry.trainers()] == [("w", True)]
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
        # With the token every call works: the same six.
        assert good.status().version == 0
        assert good.heartbeat().version == 0
        assert good.push(pb.PUSH_KIND_GRADIENT, 0, [torch.ones_like(weights)], num_samples=1, loss=0.0).version == 1
        regions = info.layout.empty_regions()
        assert good.pull(regions).version == 1
        torch.testing.assert_close(regions[0], weights - 0.1)  # the fixture's lr: the push was applied
        good.leave()
        assert not server.registry.trainers()[0].alive
        assert good.join("w2").worker_id != info.worker_id
    with PSClient(f"127.0.0.1:{server.port}", fast_timeouts(), security=Security(token="guess")) as bad:
        with pytest.raises(grpc.RpcError) as err:  # the client's own path (the token interceptor) is refused too
            bad.join("intruder")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in err.value.details()


def test_mutual_tls_admits_only_clients_signed_by_the_ca(start_server, pki):
    cert, key = pki["server"]
    server = start_server(security=Security(tls_cert=cert, tls_key=key, tls_ca=pki["ca"]))
    address = f"localhost:{server.port}"
    cert, key = pki["client"]
    with PSClient(address, fast_timeouts(), security=Security(tls_cert=cert, tls_key=key, tls_ca=pki["ca"])) as c:
        assert c.join("w").layout.hash == server.layout.hash
    cert, key = pki["rogue"]
    for security in (Security(tls_cert=cert, tls_key=key, tls_ca=pki["ca"]),  # untrusted certificate
                     Security(tls_ca=pki["ca"]),  # no certificate at all
                     Security()):  # plaintext
        with PSClient(address, fast_timeouts(connect=1.0), security=security) as c:
            with pytest.raises(ServerUnreachable):
                c.join("intruder")


def test_an_exposed_server_needs_tls_or_a_token_or_insecure():
    with pytest.raises(SecurityError, match="--insecure"):
        check_listen_address("0.0.0.0", Security(), insecure=False)
    check_listen_address("0.0.0.0", Security(token="t"), insecure=False)
    check_listen_address("0.0.0.0", Security(), insecure=True)
    check_listen_address("127.0.0.1", Security(), insecure=False)
    result = subprocess.run([sys.executable, "-m", "paramhub.ps.cli", "--host", "0.0.0.0", "--model", "mlp"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "refusing to listen on 0.0.0.0" in result.stderr


@pytest.mark.slow
def test_a_worker_without_the_token_says_so_in_plain_words(tmp_path):
    with LocalCluster(tmp_path, env={"PARAMHUB_TOKEN": "s3cret"}) as cluster:
        cluster.start_server("--model", "mlp", "--num-classes", "2", "--max-steps", "2")
        cluster.env.pop("PARAMHUB_TOKEN")
        worker = cluster.start_worker(0, "--image-size", "8", "--connect-timeout", "5")
        assert worker.wait(timeout=60) == 1
        log = cluster.read_log("worker0")
    assert f"the server at {cluster.address} refused us: missing token" in log
