r"""Server settings, and the pure device/backend selection rules (tested without a GPU)."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from loss_service.protocol import (BACKENDS, DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT, ConfigError,
                                   check_tokens)

BACKEND_CHOICES = ("auto", *BACKENDS)
# Eager is the default: on CPU it is the fastest of the three (no graph-input conversion as for
# ONNX, no TorchScript interpreter overhead) and it is the reference the others are tested against.
AUTO_BACKEND = "eager"
DEFAULT_MAX_ELEMENTS = 50_000_000
# Requests with at most this many elements are computed on the event loop: handing a 1e3-element
# batch to the thread pool costs more than computing it.
DEFAULT_INLINE_ELEMENTS = 16_384


# Peak memory of a request being computed, per byte of its body (gRPC's buffer, the body, decoded
# views, the loss's temporaries and results): at most this for every workload of
# bench/bench_memory.py (docs/service.md, "Memory").
REQUEST_MEMORY_FACTOR = 8


def memory_limit() -> int:
    r"""Bytes of memory this process may use: the cgroup's limit (v2 or v1) where lower than physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


def default_inflight_bytes() -> int:
    r"""Request bytes in flight by default: half the memory limit over :data:`REQUEST_MEMORY_FACTOR`."""
    return memory_limit() // 2 // REQUEST_MEMORY_FACTOR


def default_torch_threads() -> int:
    r"""Intra-op threads of a large request computing alone: one per core, as torch's own default.

    Concurrent large requests get one thread each (:class:`.service.IntraOpThreads`), so cores are
    never oversubscribed by the server itself; on a host shared with other busy processes, 1 avoids
    parallel ops waiting for descheduled threads.
    """
    return os.cpu_count() or 1


_CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


@dataclass(frozen=True)
class ServerConfig:
    r"""Everything ``python -m loss_service serve`` can set (flags, or ``LOSS_SERVICE_*`` variables)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    backend: str = "auto"
    device: str = "auto"
    artifacts: str = "artifacts"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_elements: int = DEFAULT_MAX_ELEMENTS
    # Sum of the body sizes of the requests being processed; above it: RESOURCE_EXHAUSTED at once.
    max_inflight_bytes: int = field(default_factory=default_inflight_bytes)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    grace_seconds: float = 10.0
    inline_elements: int = DEFAULT_INLINE_ELEMENTS
    # Build missing or stale artifacts on start (python -m loss_service.export); off, their losses (or variants)
    # are not offered on that backend.
    export_missing: bool = True
    # Worker processes exporting the missing artifacts before readiness; None: the exporter's default
    # (loss_service.export.default_jobs).
    export_jobs: Optional[int] = None
    # Intra-op threads of a large request while it is the only one computing (see default_torch_threads).
    torch_threads: int = field(default_factory=default_torch_threads)
    # Prometheus endpoint (server/metrics.py): off when None; 0 picks a free port (logged at start).
    metrics_port: Optional[int] = None
    metrics_host: str = "127.0.0.1"
    # A plaintext port serving only grpc.health.v1 on the server's host (probes that speak neither
    # TLS nor tokens, e.g. Kubernetes' gRPC probes): off when None; 0 picks a free port.
    health_port: Optional[int] = None
    # Transport security and authentication (security.py; docs/service.md, "Security").
    # PEM files: the server's certificate chain and key (TLS), and the CA of client certificates (mutual TLS).
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    # Accepted bearer tokens: a file's, and these (LOSS_SERVICE_TOKENS); none = no authentication.
    token_file: Optional[str] = None
    tokens: Tuple[str, ...] = field(default=(), repr=False)
    reflection: bool = False
    # Allow a non-loopback address without TLS and tokens (check_exposure).
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")
        if self.device != "auto" and self.device != "cpu" and not _CUDA_DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("port", "metrics_port", "health_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("max_message_bytes", "max_elements", "max_inflight_bytes", "workers", "export_jobs", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        check_settings(self)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def default_backend(self) -> str:
        return AUTO_BACKEND if self.backend == "auto" else self.backend

    def grpc_options(self) -> List[Tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]


def host_port(host: str, port: int) -> str:
    r"""``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def select_device(requested: str, cuda_available: bool, cuda_device_count: int) -> str:
    r"""The torch device for ``requested`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    ``auto`` takes ``cuda:0`` when torch sees a GPU, else ``cpu``. An explicit ``cuda``/``cuda:N``
    that cannot be honoured is a :class:`ConfigError` at start: silently scoring on CPU a workload
    someone sized for a GPU would hide a deployment mistake.
    """
    if requested == "auto":
        return "cuda:0" if cuda_available and cuda_device_count > 0 else "cpu"
    if requested == "cpu":
        return "cpu"
    match = _CUDA_DEVICE.fullmatch(requested)
    if not match:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if not cuda_available or cuda_device_count == 0:
        raise ConfigError(f"device {requested!r} requested but torch sees no CUDA device; use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= cuda_device_count:
        raise ConfigError(f"device {requested!r} requested but torch sees {cuda_device_count} CUDA device(s)")
    return f"cuda:{index}"


def provider_device(provider: str, device: str) -> str:
    r"""The device an ONNX Runtime session actually runs on, given its first provider."""
    return device if provider == "CUDAExecutionProvider" else "cpu"


ENVIRONMENT = {
    "host": "LOSS_SERVICE_HOST",
    "port": "LOSS_SERVICE_PORT",
    "backend": "LOSS_SERVICE_BACKEND",
    "device": "LOSS_SERVICE_DEVICE",
    "artifacts": "LOSS_SERVICE_ARTIFACTS",
    "max_message_bytes": "LOSS_SERVICE_MAX_MESSAGE_BYTES",
    "max_elements": "LOSS_SERVICE_MAX_ELEMENTS",
    "max_inflight_bytes": "LOSS_SERVICE_MAX_INFLIGHT_BYTES",
    "workers": "LOSS_SERVICE_WORKERS",
    "grace_seconds": "LOSS_SERVICE_GRACE_SECONDS",
    "export_jobs": "LOSS_SERVICE_JOBS",
    "torch_threads": "LOSS_SERVICE_TORCH_THREADS",
    "log_level": "LOSS_SERVICE_LOG_LEVEL",
    "metrics_port": "LOSS_SERVICE_METRICS_PORT",
    "metrics_host": "LOSS_SERVICE_METRICS_HOST",
    "health_port": "LOSS_SERVICE_HEALTH_PORT",
    "tls_cert": "LOSS_SERVICE_TLS_CERT",
    "tls_key": "LOSS_SERVICE_TLS_KEY",
    "tls_client_ca": "LOSS_SERVICE_TLS_CLIENT_CA",
    "token_file": "LOSS_SERVICE_TOKEN_FILE",
    "tokens": "LOSS_SERVICE_TOKENS",
}


def is_loopback(host: str) -> bool:
    r"""Whether ``host`` (an IP address, or a name) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(config: ServerConfig) -> None:
    r"""The security settings that go together, and :func:`check_exposure` of ``config.host``."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: the server needs its certificate and its private key")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca verifies client certificates during the TLS handshake: "
                          "it needs --tls-cert and --tls-key")
    check_tokens(config.tokens, "tokens")
    check_exposure(config.host, config)


def check_exposure(host: str, config: ServerConfig) -> None:
    r"""Refuse a non-loopback ``host`` without TLS and tokens, unless ``config.insecure``.

    Anyone who can reach such an address could otherwise read the traffic and use the service.
    """
    if config.insecure or is_loopback(host):
        return
    missing = [name for name, present in (
        ("TLS (--tls-cert, --tls-key)", config.tls_cert),
        ("tokens (--token-file or LOSS_SERVICE_TOKENS)", config.token_file or config.tokens),
    ) if not present]
    if missing:
        raise ConfigError(
            f"refusing to listen on {host!r}, which is not a loopback address, without {' and '.join(missing)}: "
            "add them (docs/service.md, Security), or pass --insecure if the network itself is trusted "
            "(e.g. a service mesh that encrypts and authenticates)"
        )


def address_host(address: str) -> str:
    r"""The host of ``host:port`` (``[::1]:50051`` -> ``::1``)."""
    return address.rpartition(":")[0].strip("[]")
