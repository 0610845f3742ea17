r"""Transport security and authentication: TLS, mutual TLS, bearer tokens, reflection, the exposure rule.

The certificates are made at run time with ``cryptography``: a CA, a server certificate for
``127.0.0.1`` and ``localhost`` (so clients need no name override), a client certificate from the
same CA, and a second, untrusted CA with its own client certificate. Servers listen on 127.0.0.1
only; the non-loopback rule is checked on configurations and on an address that is not this
machine's (binding it would fail), so nothing here ever listens on another interface.
"""
import datetime
import ipaddress
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loss_service import losses
from loss_service.__main__ import main
from loss_service.client import CLIENT_ENVIRONMENT, LossClient, LossServiceError
from loss_service.server import SERVICE_NAME, BackgroundServer, ConfigError, ServerConfig, create_server
from loss_service.protocol import parse_tokens
from loss_service.server.reflection import V1_SERVICE_NAME
from loss_service.server.config import is_loopback
from loss_service.server.security import BearerTokenInterceptor, load_server_security
from tests.test_reflection import SERVICES, VERSIONS, list_services

REPO = Path(__file__).resolve().parents[1]
TOKEN = "k7Hq-2xVb_9nW.pL~4s+Z/Qe=="
OTHER_TOKEN = "second-token-0123456789"
CALL_TIMEOUT = 20
MAX_MESSAGE_BYTES = 4 << 20
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


# -- certificates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    r"""A certificate and its key, as objects and as PEM files."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def _issue(folder: Path, name: str, issuer=None, *, ca=False, sans=(), usage=None) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.certificate.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Identity(certificate, key, cert_path, key_path)


@dataclass(frozen=True)
class Certificates:
    ca: Identity
    server: Identity
    client: Identity
    other_ca: Identity
    stranger: Identity  # a client certificate from other_ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca", ca=True)
    other_ca = _issue(folder, "other-ca", ca=True)
    return Certificates(
        ca=ca,
        server=_issue(folder, "server", ca, sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                  x509.DNSName("localhost")], usage=ExtendedKeyUsageOID.SERVER_AUTH),
        client=_issue(folder, "client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        other_ca=other_ca,
        stranger=_issue(folder, "stranger", other_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
    )


@pytest.fixture(autouse=True)
def no_client_environment(monkeypatch):
    # A developer's LOSS_SERVICE_CA or LOSS_SERVICE_TOKEN must not change what these clients send.
    for name in CLIENT_ENVIRONMENT.values():
        monkeypatch.delenv(name, raising=False)


# -- servers (127.0.0.1 only) ----------------------------------------------------------------------

def _config(server_artifacts, **security) -> ServerConfig:
    return ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing,
                        workers=1, **security)


@pytest.fixture(scope="module")
def tls_token_server(server_artifacts, certs, tmp_path_factory):
    r"""TLS, tokens from a file and from the configuration, reflection off (the default)."""
    token_file = tmp_path_factory.mktemp("tokens") / "tokens"
    token_file.write_text(f"# the CI job's token\n{TOKEN}\n\n")
    config = _config(server_artifacts, tls_cert=str(certs.server.cert_path), tls_key=str(certs.server.key_path),
                     token_file=str(token_file), tokens=(OTHER_TOKEN,), max_message_bytes=MAX_MESSAGE_BYTES,
                     health_port=0)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


@pytest.fixture(scope="module")
def mutual_tls_server(server_artifacts, certs):
    r"""Mutual TLS (client certificates from ``certs.ca``), no tokens, reflection on."""
    config = _config(server_artifacts, tls_cert=str(certs.server.cert_path), tls_key=str(certs.server.key_path),
                     tls_client_ca=str(certs.ca.cert_path), reflection=True)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, generator=generator), torch.randint(0, 3, (4, 5), generator=generator)


def expected_focal():
    predictions, targets = inputs()
    return float(losses.build("focal", gamma=2.0)(predictions, targets))


def score(client):
    return client.score("focal", *inputs(), gamma=2.0).loss


def refused(client) -> LossServiceError:
    with pytest.raises(LossServiceError) as error:
        score(client)
    return error.value


def secure_channel(target, certs, client=None):
    credentials = grpc.ssl_channel_credentials(
        certs.ca.cert_path.read_bytes(),
        client.key_path.read_bytes() if client else None,
        client.cert_path.read_bytes() if client else None,
    )
    return grpc.secure_channel(target, credentials)


# -- TLS and tokens --------------------------------------------------------------------------------

def test_tls_with_the_right_token_scores(tls_token_server, certs):
    with LossClient(tls_token_server.target, ca=certs.ca.cert_path, token=TOKEN, timeout=CALL_TIMEOUT) as client:
        assert score(client) == pytest.approx(expected_focal(), rel=1e-6)
    # Every configured token is accepted: the file's and the configuration's.
    with LossClient(tls_token_server.target, ca=certs.ca.cert_path.read_bytes(), token=OTHER_TOKEN,
                    timeout=CALL_TIMEOUT) as client:
        assert [info.name for info in client.list_losses()] == losses.names()


def test_plaintext_and_untrusted_clients_cannot_connect_to_tls(tls_token_server, certs):
    for options in ({}, {"ca": certs.other_ca.cert_path}):
        with LossClient(tls_token_server.target, token=TOKEN, timeout=CALL_TIMEOUT, wait_for_ready=False,
                        **options) as client:
            assert refused(client).code == grpc.StatusCode.UNAVAILABLE, options


def test_a_missing_token_is_unauthenticated(tls_token_server, certs):
    with LossClient(tls_token_server.target, ca=certs.ca.cert_path, timeout=CALL_TIMEOUT) as client:
        error = refused(client)
        assert error.code == UNAUTHENTICATED and "Bearer" in error.details
        with pytest.raises(LossServiceError) as stream_error:
            client.score_stream([inputs()], loss="focal")
        assert stream_error.value.code == UNAUTHENTICATED
    # Another scheme is no bearer token either.
    with secure_channel(tls_token_server.target, certs) as channel:
        with pytest.raises(grpc.RpcError) as raw_error:
            list_services(channel, V1_SERVICE_NAME, metadata=(("authorization", f"Basic {TOKEN}"),))
        assert raw_error.value.code() == UNAUTHENTICATED


def test_a_wrong_token_is_permission_denied_without_echoing_it(tls_token_server, certs):
    wrong = TOKEN[:-3] + "x=="
    with LossClient(tls_token_server.target, ca=certs.ca.cert_path, token=wrong, timeout=CALL_TIMEOUT) as client:
        error = refused(client)
    assert error.code == PERMISSION_DENIED
    assert wrong not in error.details and TOKEN not in error.details


def test_a_refused_request_is_not_read(tls_token_server, certs):
    # Larger than the server accepts, without a token: refused as unauthenticated before it is
    # received (reading it first would be RESOURCE_EXHAUSTED).
    predictions = np.zeros((MAX_MESSAGE_BYTES // 4, 2), np.float32)
    with LossClient(tls_token_server.target, ca=certs.ca.cert_path, timeout=CALL_TIMEOUT) as client:
        with pytest.raises(LossServiceError) as error:
            client.score("bce_with_logits", predictions, predictions)
    assert error.value.code == UNAUTHENTICATED


def test_health_needs_no_token(tls_token_server, certs):
    with secure_channel(tls_token_server.target, certs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(tls_token_server):
    port = tls_token_server.server.health_port
    assert port and port != tls_token_server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no TLS, no token: a kubelet's gRPC probe
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as scoring:
            channel.unary_unary(f"/{SERVICE_NAME}/ListLosses")(b"", timeout=CALL_TIMEOUT)
        assert scoring.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("version", VERSIONS)
def test_reflection_is_off_by_default_and_needs_the_token(tls_token_server, certs, version):
    with secure_channel(tls_token_server.target, certs) as channel:
        with pytest.raises(grpc.RpcError) as without_token:
            list_services(channel, version)
        assert without_token.value.code() == UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as off:
            list_services(channel, version, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_reads_its_settings_from_the_environment(tls_token_server, certs, monkeypatch):
    monkeypatch.setenv(CLIENT_ENVIRONMENT["ca"], str(certs.ca.cert_path))
    monkeypatch.setenv(CLIENT_ENVIRONMENT["token"], TOKEN)
    with LossClient(tls_token_server.target, timeout=CALL_TIMEOUT) as client:
        assert score(client) == pytest.approx(expected_focal(), rel=1e-6)


def test_cli_score_with_ca_and_token(tls_token_server, certs, tmp_path, capsys):
    predictions, targets = inputs()
    np.save(tmp_path / "p.npy", predictions.numpy())
    np.save(tmp_path / "t.npy", targets.numpy())
    (tmp_path / "token").write_text(f"{TOKEN}  # the client's token\n")
    command = ["score", "--target", tls_token_server.target, "--ca", str(certs.ca.cert_path), "--loss", "focal",
               "--predictions", str(tmp_path / "p.npy"), "--targets", str(tmp_path / "t.npy"), "--param", "gamma=2"]
    for token in (["--token", TOKEN], ["--token-file", str(tmp_path / "token")]):
        assert main(command + token) == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(expected_focal(), rel=1e-6)
    assert main(command) == 1
    assert json.loads(capsys.readouterr().err)["code"] == "UNAUTHENTICATED"


# -- mutual TLS and reflection ---------------------------------------------------------------------

def test_mutual_tls_accepts_a_client_certificate_from_the_ca(mutual_tls_server, certs):
    with LossClient(mutual_tls_server.target, ca=certs.ca.cert_path, client_cert=certs.client.cert_path,
                    client_key=certs.client.key_path, timeout=CALL_TIMEOUT) as client:
        assert score(client) == pytest.approx(expected_focal(), rel=1e-6)


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mutual_tls_refuses_other_clients(mutual_tls_server, certs, who):
    identity = {"no certificate": {}, "another CA's certificate": {
        "client_cert": certs.stranger.cert_path, "client_key": certs.stranger.key_path}}[who]
    with LossClient(mutual_tls_server.target, ca=certs.ca.cert_path, timeout=CALL_TIMEOUT, wait_for_ready=False,
                    **identity) as client:
        assert refused(client).code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("version", VERSIONS)
def test_reflection_on_lists_the_services(mutual_tls_server, certs, version):
    with secure_channel(mutual_tls_server.target, certs, client=certs.client) as channel:
        assert list_services(channel, version) == SERVICES


# -- settings and their errors (nothing listens) ------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    ServerConfig(host=host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "example.org", "localhost.example.org"])
def test_a_non_loopback_host_needs_tls_and_tokens_or_insecure(host, certs):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="not a loopback address.*TLS.*tokens.*--insecure"):
        ServerConfig(host=host)
    tls = {"tls_cert": str(certs.server.cert_path), "tls_key": str(certs.server.key_path)}
    with pytest.raises(ConfigError, match="without tokens"):
        ServerConfig(host=host, **tls)
    with pytest.raises(ConfigError, match=r"without TLS \(--tls-cert, --tls-key\):"):
        ServerConfig(host=host, tokens=(TOKEN,))
    ServerConfig(host=host, tokens=(TOKEN,), **tls)
    ServerConfig(host=host, insecure=True)


def test_insecure_on_a_reachable_address_is_a_warning_at_every_start(caplog):
    config = ServerConfig(host="192.0.2.1", insecure=True)
    with caplog.at_level(logging.INFO, logger="loss_service"):
        assert load_server_security(config, config.address).interceptors == ()
        load_server_security(config, "127.0.0.1:0")
    (exposed, loopback) = [record for record in caplog.records if record.getMessage() == "security"]
    assert exposed.levelno == logging.WARNING and exposed.fields["exposed_without_tls_or_tokens"]
    assert loopback.levelno == logging.INFO and not loopback.fields["exposed_without_tls_or_tokens"]


def test_the_bound_address_is_checked_too():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: were the check missing, binding would
    # fail with another error, and nothing would listen.
    with pytest.raises(ConfigError, match="'192.0.2.1', which is not a loopback address"):
        create_server("192.0.2.1:0", ServerConfig(port=0))


def serve_exit(tmp_path, *flags, **environment):
    r"""``python -m loss_service serve`` expected to stop on its configuration: (exit code, stderr)."""
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("LOSS_SERVICE_")}, **environment}
    result = subprocess.run([sys.executable, "-m", "loss_service", "serve", "--port", "0", "--no-export",
                             "--artifacts", str(tmp_path), *flags], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stderr


def test_serve_refuses_a_non_loopback_host_with_exit_2(tmp_path):
    # Not 0.0.0.0: were the rule broken, binding 192.0.2.1 (TEST-NET-1) would fail instead of listening.
    returncode, stderr = serve_exit(tmp_path, "--host", "192.0.2.1")
    assert returncode == 2
    error = json.loads(stderr.strip().splitlines()[-1])["error"]
    assert "not a loopback address" in error and "--insecure" in error and "--tls-cert" in error


def test_serve_reads_tokens_from_the_environment_without_echoing_them(tmp_path):
    returncode, stderr = serve_exit(tmp_path, LOSS_SERVICE_TOKENS=f"{TOKEN}, secret\u00e9token")
    assert returncode == 2
    assert "LOSS_SERVICE_TOKENS: token 2 has a character" in stderr
    assert "secret" not in stderr and TOKEN not in stderr


def test_parse_tokens():
    text = f"# comment\n{TOKEN}\n\n  {OTHER_TOKEN}, third # trailing comment\n"
    assert parse_tokens(text, "file") == (TOKEN, OTHER_TOKEN, "third")
    for empty in ("", "\n# only a comment\n", " , "):
        with pytest.raises(ConfigError, match="file holds no token"):
            parse_tokens(empty, "file")
    with pytest.raises(ConfigError, match="token 2 has a character") as error:
        parse_tokens("good secret\"quote", "file")
    assert "secret" not in str(error.value)


def test_the_interceptor_answers_by_the_metadata():
    interceptor = BearerTokenInterceptor([TOKEN, OTHER_TOKEN])
    for metadata in (None, (), (("x-other", "1"),), (("authorization", TOKEN),), (("authorization", f"Basic {TOKEN}"),),
                     (("authorization", "Bearer "),)):
        assert interceptor.refusal(metadata).code == UNAUTHENTICATED, metadata
    assert interceptor.refusal((("authorization", f"Bearer {TOKEN}x"),)).code == PERMISSION_DENIED
    assert interceptor.refusal((("authorization", f"Bearer {TOKEN[:-1]}"),)).code == PERMISSION_DENIED
    for token in (TOKEN, OTHER_TOKEN):
        assert interceptor.refusal((("x-other", "1"), ("authorization", f"bearer {token}"))) is None


def test_no_tokens_no_interceptor_and_no_tls():
    security = load_server_security(ServerConfig(), "127.0.0.1:0")
    assert security.interceptors == () and security.credentials is None


def _load(**settings):
    return load_server_security(ServerConfig(**settings), "127.0.0.1:0")


def test_security_settings_errors(certs, tmp_path):
    server = {"tls_cert": str(certs.server.cert_path), "tls_key": str(certs.server.key_path)}
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_key=server["tls_key"])
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=server["tls_cert"])
    with pytest.raises(ConfigError, match="--tls-client-ca .* needs --tls-cert"):
        ServerConfig(tls_client_ca=str(certs.ca.cert_path))
    with pytest.raises(ConfigError, match="tokens: token 1 has a character"):
        ServerConfig(tokens=("two words",))
    with pytest.raises(ConfigError, match=f"--tls-cert {tmp_path / 'missing.crt'}: No such file"):
        _load(tls_cert=str(tmp_path / "missing.crt"), tls_key=server["tls_key"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its private key"):
        _load(tls_cert=str(tmp_path / "junk.pem"), tls_key=server["tls_key"])
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its private key .*KEY_VALUES_MISMATCH"):
        _load(tls_cert=server["tls_cert"], tls_key=str(certs.client.key_path))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(certs.server.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="the private key is encrypted"):
        _load(tls_cert=server["tls_cert"], tls_key=str(encrypted))
    with pytest.raises(ConfigError, match="--tls-client-ca .*: not PEM certificates"):
        _load(tls_client_ca=str(tmp_path / "junk.pem"), **server)
    with pytest.raises(ConfigError, match="--tls-client-ca .*: No such file"):
        _load(tls_client_ca=str(tmp_path / "missing.crt"), **server)
    (tmp_path / "empty-tokens").write_text("# rotated out\n\n")
    with pytest.raises(ConfigError, match="empty-tokens holds no token"):
        _load(token_file=str(tmp_path / "empty-tokens"))
    with pytest.raises(ConfigError, match="cannot read token file .*missing-tokens"):
        _load(token_file=str(tmp_path / "missing-tokens"))
    (tmp_path / "tokens").write_text(TOKEN)
    loaded = _load(tls_client_ca=str(certs.ca.cert_path), token_file=str(tmp_path / "tokens"), **server)
    assert loaded.credentials is not None and len(loaded.interceptors) == 1


def test_client_settings_errors(certs):
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        LossClient("127.0.0.1:1", client_cert=certs.client.cert_path)
    with pytest.raises(ValueError, match="either credentials or ca"):
        LossClient("127.0.0.1:1", credentials=grpc.ssl_channel_credentials(), ca=certs.ca.cert_path)
