r"""Python client of the ``loss_service.v1.LossService`` gRPC API.

Example::

    from loss_service.client import LossClient

    with LossClient("127.0.0.1:50051") as client:
        result = client.score("focal", logits, targets, weights, reduction="mean", gamma=2.0)
        print(result.loss, result.backend, result.device)

Over TLS with a bearer token (docs/service.md, Security)::

    with LossClient("scoring.example.org:50051", ca="ca.pem", token=token) as client: ...

Several replicas, every call balanced over them (round robin) and retried on another one when a
replica is unavailable (docs/service.md, Replicas)::

    LossClient(["10.0.0.5:50051", "10.0.0.6:50051"])     # addresses
    LossClient("dns:///loss-service-headless.ml.svc.cluster.local:50051")   # every address of a name

Per group, and merged across workers (docs/evaluation.md)::

    part = client.score("dice", logits, labels, group_ids=site, return_statistics=True, mode="multiclass")
    part.group_ids, part.group_losses          # the loss of each site's samples
    total = client.merge([part.statistics, other_worker_statistics])   # as one score on all the data

Per class (docs/evaluation.md)::

    result = client.score("dice", logits, labels, return_per_class=True, mode="multiclass")
    result.class_losses, result.class_scores   # each class's Dice loss, and its Dice score

Inputs may be numpy arrays or torch tensors of any supported dtype (torch's bfloat16 included).
Every failure is a :class:`LossServiceError` with the gRPC status code and the server's
``google.rpc.BadRequest`` field violations.
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any, AsyncIterable, AsyncIterator, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union,
)

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loss_service.codec import read_statistics, statistics_message, to_message, to_numpy
from loss_service.protocol import BACKENDS, DEFAULT_MAX_MESSAGE_BYTES, REDUCTIONS, SERVICE_NAME, bearer_metadata
from loss_service.statistics import Statistics, merge
from loss_service.v1 import loss_service_pb2 as pb
from loss_service.v1 import loss_service_pb2_grpc as pb_grpc



class LossServiceError(Exception):
    r"""A failed call: ``code`` (``grpc.StatusCode``), ``details`` and ``field_violations``."""

    def __init__(self, code: grpc.StatusCode, details: str, field_violations: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations: List[Tuple[str, str]] = list(field_violations)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "LossServiceError":
        violations: List[Tuple[str, str]] = []
        status = rpc_status.from_call(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    violations += [(v.field, v.description) for v in bad_request.field_violations]
        return cls(error.code(), error.details() or "", violations)


@dataclass
class ScoreResult:
    r"""The answer of :meth:`LossClient.score` (``values`` for ``reduction="none"`` only; ``group_ids`` and
    ``group_losses`` with ``group_ids``; ``statistics`` with ``return_statistics=True``; ``class_losses``, and
    ``class_scores`` for region losses, with ``return_per_class=True``)."""

    loss: float
    values: Optional[np.ndarray]
    per_sample: Optional[np.ndarray]
    weight_sum: float
    denominator: float
    num_elements: int
    backend: str
    device: str
    request_id: str
    group_ids: Optional[np.ndarray] = None
    group_losses: Optional[np.ndarray] = None
    statistics: Optional[Statistics] = None
    class_losses: Optional[np.ndarray] = None
    class_scores: Optional[np.ndarray] = None


@dataclass
class StreamResult:
    r"""The dataset-level answer of :meth:`LossClient.score_stream` and :meth:`LossClient.merge`."""

    loss: float
    weight_sum: float
    denominator: float
    num_elements: int
    num_batches: int
    backend: str
    device: str
    group_ids: Optional[np.ndarray] = None
    group_losses: Optional[np.ndarray] = None
    statistics: Optional[Statistics] = None
    class_losses: Optional[np.ndarray] = None
    class_scores: Optional[np.ndarray] = None


@dataclass
class ParamInfo:
    name: str
    kind: str
    default: Any
    range: str
    doc: str
    choices: List[str]
    request_field: str


@dataclass
class LossInfo:
    name: str
    family: str
    summary: str
    predictions: str
    targets: str
    prediction_shape: str
    target_shape: str
    reference: str
    backends: List[str]
    params: List[ParamInfo] = field(default_factory=list)


def _param(value: Any, name: str) -> pb.Param:
    if isinstance(value, (bool, np.bool_)):
        return pb.Param(bool_value=bool(value))
    if isinstance(value, (int, np.integer)):
        return pb.Param(int_value=int(value))
    if isinstance(value, (float, np.floating)):
        return pb.Param(double_value=float(value))
    if isinstance(value, str):
        return pb.Param(string_value=value)
    raise TypeError(f"parameter '{name}': expected a number, bool or string (send vectors as arrays), got {type(value).__name__}")


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, list, tuple)) or type(value).__module__.startswith("torch")


def build_request(
    loss: str,
    predictions: Any,
    targets: Any,
    weights: Any = None,
    *,
    reduction: Optional[str] = "mean",
    backend: Optional[str] = None,
    class_weights: Any = None,
    pos_weight: Any = None,
    return_per_sample: bool = False,
    request_id: Optional[str] = None,
    labels: Optional[Mapping[str, str]] = None,
    group_ids: Any = None,
    return_statistics: bool = False,
    return_per_class: bool = False,
    **params: Any,
) -> pb.ScoreBatchRequest:
    r"""The ``ScoreBatchRequest`` of :meth:`LossClient.score` (array-valued params go to ``tensor_params``).

    ``reduction=None`` leaves it unspecified (the server reads it as ``mean``; in a stream, "as in
    the first batch").
    """
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    request = pb.ScoreBatchRequest(
        loss=loss,
        reduction=pb.REDUCTION_UNSPECIFIED if reduction is None else REDUCTIONS[reduction],
        backend=pb.BACKEND_UNSPECIFIED if backend is None else BACKENDS[backend],
        return_per_sample=return_per_sample,
        request_id=request_id or "",
        labels=dict(labels or {}),
        return_statistics=return_statistics,
        return_per_class=return_per_class,
    )
    request.predictions.CopyFrom(to_message(predictions, "predictions"))
    request.targets.CopyFrom(to_message(targets, "targets"))
    if weights is not None:
        request.weights.CopyFrom(to_message(weights, "weights"))
    if class_weights is not None:
        request.class_weights.CopyFrom(to_message(class_weights, "class_weights"))
    if pos_weight is not None:
        request.pos_weight.CopyFrom(to_message(pos_weight, "pos_weight"))
    if group_ids is not None:
        request.group_ids.CopyFrom(to_message(group_ids, "group_ids"))
    for name, value in params.items():
        if _is_array(value) and np.ndim(value) == 0:
            value = value.item() if hasattr(value, "item") else value
        if _is_array(value):
            request.tensor_params[name].CopyFrom(to_message(value, name))
        else:
            request.params[name].CopyFrom(_param(value, name))
    return request


# What LossClient reads when the argument of the same name is not given (docs/service.md, Security).
CLIENT_ENVIRONMENT = {
    "ca": "LOSS_SERVICE_CA",
    "client_cert": "LOSS_SERVICE_CLIENT_CERT",
    "client_key": "LOSS_SERVICE_CLIENT_KEY",
    "token": "LOSS_SERVICE_TOKEN",
}
# A PEM file's path, or its bytes.
Pem = Union[str, os.PathLike, bytes]


# Calls are pure functions of their request, so a call a replica could not take (it is stopping or
# gone) is safe to send to another: gRPC retries UNAVAILABLE calls itself, with backoff, as long as
# no response has started and the request fits its retry buffer.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Requests up to this size are kept for a retry (larger ones are sent once).
RETRY_BUFFER_BYTES = 64 * 1024 * 1024
# A replica that went away is tried again after at most this long (gRPC's default is 120 s).
MAX_RECONNECT_BACKOFF_MS = 5000
# Deadline of a call that is not a stream, unless the client is given another.
DEFAULT_TIMEOUT_SECONDS = 120.0


def service_config() -> str:
    r"""The channel's gRPC service config: round-robin over every address whose readiness (the
    LossService's ``grpc.health.v1`` status) is SERVING, and the retry policy for every method."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
        "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}],
    })


def channel_target(target: Union[str, Sequence[str]]) -> str:
    r"""The gRPC target of ``target``: ``"host:port"`` or a gRPC URI (``dns:///name:port``) as they
    are; several ``"ip:port"`` addresses as one ``ipv4:``/``ipv6:`` target (gRPC's own address list)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target: give at least one address")
    families = set()
    for address in addresses:
        host, colon, port = address.rpartition(":")
        if not colon or not port.isdigit():
            raise ValueError(f"target: {address!r} has no port")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"target: several addresses must be IP:port (got {address!r}); for replicas behind a "
                             f"name use one target 'dns:///name:port', which resolves to every address") from None
    if len(families) > 1:
        raise ValueError("target: give IPv4 or IPv6 addresses, not both")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _setting(value: Any, name: str) -> Any:
    return value if value is not None else (os.environ.get(CLIENT_ENVIRONMENT[name]) or None)


def _pem(source: Optional[Pem]) -> Optional[bytes]:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def tls_credentials(ca: Optional[Pem] = None, client_cert: Optional[Pem] = None,
                    client_key: Optional[Pem] = None) -> Optional[grpc.ChannelCredentials]:
    r"""TLS credentials trusting ``ca`` (``None``: the system's roots) and presenting ``client_cert``
    with ``client_key`` (mutual TLS); ``None`` (plaintext) when none of them is given."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (the certificate and its private key)")
    if ca is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca), private_key=_pem(client_key),
                                        certificate_chain=_pem(client_cert))


def _settings(
    target: Union[str, Sequence[str]],
    max_message_bytes: int,
    ca: Optional[Pem],
    client_cert: Optional[Pem],
    client_key: Optional[Pem],
    token: Optional[str],
    credentials: Optional[grpc.ChannelCredentials],
) -> Tuple[str, Optional[grpc.ChannelCredentials], List[Tuple[str, Any]], Optional[Tuple[Tuple[str, str], ...]]]:
    r"""``(gRPC target, channel credentials or None, channel options, call metadata)`` of a client's arguments."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", min(max_message_bytes, RETRY_BUFFER_BYTES)),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if credentials is None:
        credentials = tls_credentials(_setting(ca, "ca"), _setting(client_cert, "client_cert"),
                                      _setting(client_key, "client_key"))
    elif ca is not None or client_cert is not None or client_key is not None:
        raise ValueError("pass either credentials or ca/client_cert/client_key, not both")
    token = _setting(token, "token")
    # Metadata of every call rather than gRPC call credentials: those are refused on plaintext
    # channels, and run a Python plugin per call.
    return channel_target(target), credentials, options, bearer_metadata(token) if token else None


def _optional_array(response: Any, name: str) -> Optional[np.ndarray]:
    return to_numpy(getattr(response, name), name) if response.HasField(name) else None


def _group_fields(response: Any) -> Dict[str, Any]:
    r"""The group, class and statistics fields of a ScoreBatch or ScoreStream response."""
    statistics = read_statistics(response.statistics) if response.HasField("statistics") else None
    return dict(
        group_ids=_optional_array(response, "group_ids"), group_losses=_optional_array(response, "group_losses"),
        statistics=statistics, class_losses=_optional_array(response, "class_losses"),
        class_scores=_optional_array(response, "class_scores"),
    )


def score_result(response: pb.ScoreBatchResponse) -> ScoreResult:
    return ScoreResult(
        loss=response.loss,
        values=_optional_array(response, "values"),
        per_sample=_optional_array(response, "per_sample"),
        weight_sum=response.weight_sum,
        denominator=response.denominator,
        num_elements=response.num_elements,
        backend=response.backend,
        device=response.device,
        request_id=response.request_id,
        **_group_fields(response),
    )


def stream_result(response: pb.ScoreStreamResponse) -> StreamResult:
    return StreamResult(
        loss=response.loss,
        weight_sum=response.weight_sum,
        denominator=response.denominator,
        num_elements=response.num_elements,
        num_batches=response.num_batches,
        backend=response.backend,
        device=response.device,
        **_group_fields(response),
    )


def merge_request(statistics: Iterable[Statistics]) -> pb.MergeStatisticsRequest:
    r"""The ``MergeStatisticsRequest`` of :meth:`LossClient.merge`: ``statistics`` merged here first
    (:func:`loss_service.statistics.merge`: statistics of different settings raise ``ValueError`` before
    any call), sent as one message."""
    return pb.MergeStatisticsRequest(statistics=[statistics_message(merge(statistics))])


def loss_infos(response: pb.ListLossesResponse) -> List[LossInfo]:
    return [
        LossInfo(
            name=info.name,
            family=info.family,
            summary=info.summary,
            predictions=info.predictions,
            targets=info.targets,
            prediction_shape=info.prediction_shape,
            target_shape=info.target_shape,
            reference=info.reference,
            backends=[pb.Backend.Name(b).removeprefix("BACKEND_").lower() for b in info.backends],
            params=[
                ParamInfo(
                    name=p.name,
                    kind=p.kind,
                    default=getattr(p.default_value, p.default_value.WhichOneof("value")) if p.HasField("default_value") else None,
                    range=p.range,
                    doc=p.doc,
                    choices=list(p.choices),
                    request_field=p.request_field,
                )
                for p in info.params
            ],
        )
        for info in response.losses
    ]


Batch = Union[Mapping[str, Any], Sequence[Any]]


class StreamRequests:
    r"""The requests of a ``ScoreStream`` call: one per batch, the loss and ``options`` with the first.

    Each batch is a tuple ``(predictions, targets[, weights])`` or a dict with those keys, which may
    also carry settings of its own. The first request is built at once, so that a client-side
    mistake raises before the call starts (inside the call gRPC would report it as UNKNOWN).
    """

    def __init__(self, batches: Union[Iterable[Batch], AsyncIterable[Batch]], loss: Optional[str], options: Dict[str, Any]):
        self._loss = loss
        self._options = options
        self._batches = batches
        self.first: Optional[pb.ScoreBatchRequest] = None
        if not isinstance(batches, AsyncIterable):
            self._iterator = iter(batches)
            self.first = next((self.request(0, batch) for batch in itertools.islice(self._iterator, 1)), None)

    def request(self, index: int, batch: Batch) -> pb.ScoreBatchRequest:
        if isinstance(batch, Mapping):
            fields = dict(batch)
            missing = [name for name in ("predictions", "targets") if name not in fields]
            if missing:
                raise ValueError(f"batch {index}: a dict batch needs {' and '.join(missing)}")
            arguments = (fields.pop("predictions"), fields.pop("targets"), fields.pop("weights", None))
            loss = fields.pop("loss", self._loss if index == 0 else None)
        else:
            if not 2 <= len(batch) <= 3:
                raise ValueError(f"batch {index}: expected (predictions, targets[, weights]), got {len(batch)} items")
            arguments = tuple(batch) + (None,) * (3 - len(batch))
            fields, loss = {}, (self._loss if index == 0 else None)
        if index == 0:
            fields = dict(self._options, **fields)
            if not loss:
                raise ValueError("score_stream needs the loss name (the `loss` argument or the first batch's 'loss')")
        else:
            # Unset settings mean "as in batch 0"; the client's default reduction is not sent again.
            fields.setdefault("reduction", None)
        try:
            return build_request(loss or "", *arguments, **fields)
        except (TypeError, ValueError) as error:
            raise type(error)(f"batch {index}: {error}") from None

    def __iter__(self) -> Iterator[pb.ScoreBatchRequest]:
        if self.first is not None:
            yield self.first
        for index, batch in enumerate(self._iterator, start=1):
            yield self.request(index, batch)

    async def __aiter__(self) -> AsyncIterator[pb.ScoreBatchRequest]:
        if not isinstance(self._batches, AsyncIterable):
            for request in self:
                yield request
            return
        index = 0
        async for batch in self._batches:
            yield self.request(index, batch)
            index += 1


class _Client:
    r"""What :class:`LossClient` and :class:`AsyncLossClient` share: their settings and the requests they send."""

    _CLIENT_ARGUMENTS = r"""
    Args:
        target: ``host:port``, a gRPC target URI such as ``dns:///name:port`` (every address the
            name resolves to), or a list of ``ip:port`` addresses. Calls are balanced round-robin
            over the addresses that report readiness (``grpc.health.v1``), and a call answered
            ``UNAVAILABLE`` (a replica stopping or gone) is retried on another with backoff, up
            to :data:`RETRY_POLICY`'s attempts, if its request is at most :data:`RETRY_BUFFER_BYTES`.
        timeout: the deadline of ``score``, ``score_request`` and ``list_losses`` calls, in seconds
            (default :data:`DEFAULT_TIMEOUT_SECONDS`; ``None``: no deadline).
        stream_timeout: the deadline of ``score_stream`` calls (default ``None``: a stream lasts
            as long as its dataset).
        wait_for_ready: calls wait, within their deadline, for a server to be reachable and
            ready (a server still starting, a replica restarting) instead of failing at once with
            ``UNAVAILABLE``; ``False`` fails fast (a wrong address or TLS setting is then reported
            at once rather than when the deadline passes).
        max_message_bytes: the largest request/response the channel accepts; the default matches
            the server's default ``--max-message-bytes`` (gRPC's own default is 4 MiB).
        ca: the PEM CA certificate (path or bytes) the server's certificate is checked against:
            connect over TLS. ``client_cert`` and ``client_key`` (PEM) add a client certificate
            (mutual TLS); with them alone, TLS trusts the system's roots.
        token: bearer token sent as ``authorization: Bearer <token>`` metadata with every call.
            It is sent on plaintext channels too (a server on loopback, or behind a mesh that
            encrypts): there it travels in clear.
        credentials: any other ``grpc.ChannelCredentials`` (e.g. ``grpc.ssl_channel_credentials()``
            for TLS with the system's roots), instead of ``ca``/``client_cert``/``client_key``.

    Those of ``ca``, ``client_cert``, ``client_key`` (without ``credentials``) and ``token`` that are
    not given are read from :data:`CLIENT_ENVIRONMENT` (``LOSS_SERVICE_CA``, ...). Inputs are numpy
    arrays (or anything ``np.asarray`` takes; torch tensors too, when torch is installed); results
    hold numpy arrays. Every failure is a :class:`LossServiceError`.
    """

    def __init__(
        self,
        target: Union[str, Sequence[str]],
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT_SECONDS,
        stream_timeout: Optional[float] = None,
        wait_for_ready: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ca: Optional[Pem] = None,
        client_cert: Optional[Pem] = None,
        client_key: Optional[Pem] = None,
        token: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
    ) -> None:
        self.target, credentials, options, self._metadata = _settings(
            target, max_message_bytes, ca, client_cert, client_key, token, credentials)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.wait_for_ready = wait_for_ready
        self._channel = self._open(self.target, credentials, options)
        self._stub = pb_grpc.LossServiceStub(self._channel)

    def _open(self, target: str, credentials: Optional[grpc.ChannelCredentials], options: List[Tuple[str, Any]]):
        raise NotImplementedError


class LossClient(_Client):
    __doc__ = r"""A channel to a LossService; use as a context manager (``with LossClient(target) as c:``).
    """ + _Client._CLIENT_ARGUMENTS

    def _open(self, target, credentials, options):
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> "LossClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: Optional[float]):
        try:
            return method(request, timeout=timeout, metadata=self._metadata, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            raise LossServiceError.from_rpc_error(error) from None

    def score(self, loss: str, predictions: Any, targets: Any, weights: Any = None, **options: Any) -> ScoreResult:
        r"""Score one batch; ``options`` are those of :func:`build_request` (``reduction``, ``backend``,
        ``class_weights``, ``pos_weight``, ``return_per_sample``, ``request_id``, ``labels``,
        ``group_ids`` (``(N,)`` integer labels: the loss of each group too), ``return_statistics``
        (the batch's mergeable :class:`~loss_service.statistics.Statistics`), ``return_per_class`` (the loss of
        each class, and a region loss's index per class), and the loss's hyperparameters by name, e.g.
        ``gamma=2.0``)."""
        return self.score_request(build_request(loss, predictions, targets, weights, **options))

    def score_request(self, request: pb.ScoreBatchRequest) -> ScoreResult:
        return score_result(self._call(self._stub.ScoreBatch, request, self.timeout))

    def score_stream(self, batches: Iterable[Batch], loss: Optional[str] = None, **options: Any) -> StreamResult:
        r"""Score a dataset sent as batches; the answer equals :meth:`score` on their concatenation.

        Each batch is a tuple ``(predictions, targets[, weights])`` or a dict with those keys (and
        ``group_ids``, in every batch or in none).
        ``loss`` and ``options`` (reduction, backend, parameters) are sent with the first batch;
        a dict batch may also carry them itself.
        """
        requests = StreamRequests(batches, loss, options)
        return stream_result(self._call(self._stub.ScoreStream, iter(requests), self.stream_timeout))

    def merge(self, statistics: Iterable[Statistics]) -> StreamResult:
        r"""The value of the union of the data whose ``statistics`` (``ScoreResult.statistics``,
        ``StreamResult.statistics``, from any number of calls, workers or replicas) are given: exactly
        :meth:`score` on all of it, per group too; ``result.statistics`` are the merged statistics."""
        return stream_result(self._call(self._stub.MergeStatistics, merge_request(statistics), self.timeout))

    def list_losses(self) -> List[LossInfo]:
        return loss_infos(self._call(self._stub.ListLosses, pb.ListLossesRequest(), self.timeout))


class AsyncLossClient(_Client):
    __doc__ = r"""A :class:`LossClient` for asyncio (grpc.aio): the same methods, awaited; use as
    ``async with AsyncLossClient(target) as client:``.
    """ + _Client._CLIENT_ARGUMENTS

    def _open(self, target, credentials, options):
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> "AsyncLossClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: Optional[float]):
        try:
            return await method(request, timeout=timeout, metadata=self._metadata, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            raise LossServiceError.from_rpc_error(error) from None

    async def score(self, loss: str, predictions: Any, targets: Any, weights: Any = None, **options: Any) -> ScoreResult:
        r"""Score one batch (:meth:`LossClient.score`)."""
        return await self.score_request(build_request(loss, predictions, targets, weights, **options))

    async def score_request(self, request: pb.ScoreBatchRequest) -> ScoreResult:
        return score_result(await self._call(self._stub.ScoreBatch, request, self.timeout))

    async def score_stream(self, batches: Union[Iterable[Batch], AsyncIterable[Batch]], loss: Optional[str] = None,
                           **options: Any) -> StreamResult:
        r"""Score a dataset sent as batches (:meth:`LossClient.score_stream`); ``batches`` may be an
        async iterable too."""
        requests = StreamRequests(batches, loss, options)
        return stream_result(await self._call(self._stub.ScoreStream, requests.__aiter__(), self.stream_timeout))

    async def merge(self, statistics: Iterable[Statistics]) -> StreamResult:
        r"""The value of merged statistics (:meth:`LossClient.merge`)."""
        return stream_result(await self._call(self._stub.MergeStatistics, merge_request(statistics), self.timeout))

    async def list_losses(self) -> List[LossInfo]:
        return loss_infos(await self._call(self._stub.ListLosses, pb.ListLossesRequest(), self.timeout))
