r"""The compute backends: eager PyTorch, TorchScript and ONNX Runtime.

A backend turns ``(loss spec, validated hyperparameters)`` into a *runner*, an object with the three
methods every loss module has::

    statistics(predictions, targets, weights, per_sample, values, per_class) -> (values, totals, sample_totals)
    reductions(totals) -> (..., 3)   # [sum, mean, weighted_mean], float64
    class_reductions(class_totals) -> (C, 3) or (C, 4)   # per class, and a region loss's index

(``values=False``: the values may be empty, the caller reads the totals only; ``per_class``: the third
output is the class totals ``(C, K_c)``).

Runners are built once per hyperparameter configuration and kept in a small LRU cache with a byte
budget -- but only once they have served a valid request, so a rejected request leaves nothing
behind. A cached runner is never modified afterwards, so concurrent requests can share it.
"""
from __future__ import annotations

import copy
import hashlib
import io
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Dict, Hashable, Optional, Protocol, Tuple

import torch
from torch import Tensor

from loss_service import export, layout, losses
from loss_service.losses import LossSpec

from .config import provider_device

DEFAULT_CACHE_SIZE = 64
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
# Memory of a runner besides its hyperparameter tensors: a module's Python objects (TorchScript
# copies share their code with the loaded module; ONNX runners share the sessions).
RUNNER_BYTES = 4096


class Runner(Protocol):
    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor], per_sample: bool, values: bool,
        per_class: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]: ...

    def reductions(self, totals: Tensor) -> Tensor: ...

    def class_reductions(self, class_totals: Tensor) -> Tensor: ...


class RunnerCache:
    r"""A thread-safe LRU map from a configuration key to its runner, bounded in entries and bytes.

    A runner's cost (its hyperparameter tensors and the backend's per-runner memory) counts
    against ``max_bytes``; a runner costing more than a quarter of it is not kept at all.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._entries: "OrderedDict[Hashable, Tuple[Runner, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Runner]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, runner: Runner, cost: int) -> None:
        if cost > self._max_bytes // 4:
            return
        with self._lock:
            # Two threads may build the same configuration at once; both are equivalent, one is kept.
            if key in self._entries:
                return
            self._entries[key] = (runner, cost)
            self._bytes += cost
            while len(self._entries) > self._capacity or self._bytes > self._max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes


def config_key(loss: str, params: Dict[str, Any]) -> Hashable:
    r"""A hashable identity of ``(loss, params)``; tensors are keyed by dtype, shape and a digest of their bytes."""
    items = []
    for name in sorted(params):
        value = params[name]
        if isinstance(value, Tensor):
            data = value.detach().cpu().contiguous().numpy()
            value = ("tensor", str(value.dtype), tuple(value.shape), hashlib.blake2b(data.data, digest_size=32).digest())
        items.append((name, value))
    return (loss, tuple(items))


def params_bytes(params: Dict[str, Any]) -> int:
    r"""Bytes of the tensors among ``params`` (what a runner built from them holds)."""
    return sum(value.numel() * value.element_size() for value in params.values() if isinstance(value, Tensor))


class Backend:
    r"""Common interface: ``name``, ``device``, ``supports(loss)``, and runners: :meth:`build`,
    :meth:`keep` and :meth:`kept`."""

    name: str = ""

    def __init__(self, device: str) -> None:
        self.device = device
        self.torch_device = torch.device(device)
        self._cache = RunnerCache()
        # Losses this backend must not serve (artifact failed its start-up check), with the reason.
        self.disabled: Dict[str, str] = {}

    def supports(self, loss: str) -> bool:
        return loss not in self.disabled and self._has(loss)

    def _has(self, loss: str) -> bool:
        raise NotImplementedError

    def disable(self, loss: str, reason: str) -> None:
        self.disabled[loss] = reason

    def kept(self, key: Hashable) -> Optional[Runner]:
        r"""The cached runner of the configuration ``key`` (:func:`config_key`), if any."""
        return self._cache.get(key)

    def build(self, spec: LossSpec, params: Dict[str, Any]) -> Runner:
        r"""A new runner of ``(spec, params)``: :meth:`keep` it once it has served a valid request."""
        raise NotImplementedError

    def keep(self, key: Hashable, runner: Runner, params: Dict[str, Any]) -> None:
        r"""Cache ``runner`` under ``key``: call it once the runner has served a valid request."""
        self._cache.put(key, runner, RUNNER_BYTES + params_bytes(params))

    def cache_usage(self) -> Tuple[int, int]:
        r"""How many runners are cached, and the bytes they are counted for (the metrics report both)."""
        return len(self._cache), self._cache.bytes

    def device_of(self, spec: LossSpec, params: Dict[str, Any]) -> str:
        r"""The device that runs ``spec`` (the ONNX backend may fall back per session)."""
        return self.device


class EagerBackend(Backend):
    r"""The loss modules themselves, built with ``losses.build`` and moved to the device."""

    name = "eager"

    def _has(self, loss: str) -> bool:
        return loss in losses.names()

    def build(self, spec: LossSpec, params: Dict[str, Any]) -> Runner:
        return losses.build(spec.name, **params).to(self.torch_device).eval()


def configure_scripted(
    scripted: torch.jit.ScriptModule, spec: LossSpec, configured: torch.nn.Module, device: torch.device
) -> None:
    r"""Copy ``configured``'s hyperparameters (typed attributes and buffers) onto ``scripted``.

    Attributes and buffers carry the ParamSpec names, and ``configured`` is the eager module that
    ``losses.build`` made from the validated request parameters, so the scripted copy ends up with
    exactly the representation the eager module uses (e.g. an empty buffer for an unset vector).
    Only ``spec``'s parameters are copied: a module's other attributes (a region loss's overlap
    constants) are TorchScript constants.
    """
    buffers = dict(configured.named_buffers(recurse=False))
    for param in spec.params:
        if param.name in buffers:
            setattr(scripted, param.name, buffers[param.name].to(device))
        else:
            setattr(scripted, param.name, getattr(configured, param.name))


class TorchScriptBackend(Backend):
    r"""The exported ``<loss>.pt`` files; one separate copy of the module per hyperparameter configuration.

    ``scripts`` maps a loss name to the verified bytes of its ``.pt`` file. Each is loaded once, on
    first use (``map_location=device``; :func:`loss_service.export.check_scripted` checks that it is the
    loss's module and raises ``ArtifactError`` otherwise). A configuration gets a deep copy of that
    module whose attributes are then set -- its own attributes and buffers, the code shared -- so a
    module that serves one request is never changed by another, and a new configuration costs no
    new load (which holds the GIL for tens of milliseconds).
    """

    name = "torchscript"

    def __init__(self, device: str, scripts: Dict[str, bytes]) -> None:
        super().__init__(device)
        self._scripts = dict(scripts)
        self._loaded: Dict[str, torch.jit.ScriptModule] = {}
        self._load_lock = threading.Lock()

    def _has(self, loss: str) -> bool:
        return loss in self._scripts

    def _module(self, spec: LossSpec) -> torch.jit.ScriptModule:
        r"""The loaded and checked module of ``spec``, never configured itself."""
        with self._load_lock:
            module = self._loaded.get(spec.name)
            if module is None:
                module = torch.jit.load(io.BytesIO(self._scripts[spec.name]), map_location=self.torch_device)
                export.check_scripted(spec, module, losses.build(spec.name))
                self._loaded[spec.name] = module
            return module

    def build(self, spec: LossSpec, params: Dict[str, Any]) -> Runner:
        scripted = copy.deepcopy(self._module(spec))
        configure_scripted(scripted, spec, losses.build(spec.name, **params), self.torch_device)
        return scripted.eval()


class OnnxRunner:
    r"""One hyperparameter configuration on the exported ONNX graphs of a loss.

    The graph computes the statistics on the canonical layout (:mod:`loss_service.layout`);
    ``reductions`` of (possibly accumulated) totals is the library's float64 reductions kernel, a
    handful of divisions that need no graph of their own. An empty batch holds no data to compute
    with, and ONNX Runtime cannot run every graph on zero-sized inputs (it reuses buffers across
    shapes that differ only when a dimension is 0): its statistics are the library's.
    """

    def __init__(self, backend: "OnnxBackend", spec: LossSpec, params: Dict[str, Any]) -> None:
        self._backend = backend
        self._spec = spec
        self._params = params
        self._library = losses.build(spec.name, **params)

    def statistics(
        self, predictions: Tensor, targets: Tensor, weights: Optional[Tensor], per_sample: bool, values: bool,
        per_class: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        r"""The graph's statistics; it writes the values (and computes every breakdown) whatever ``values``,
        ``per_sample`` and ``per_class`` say."""
        if predictions.numel() == 0:
            return self._library.statistics(predictions, targets, weights, per_sample, values, per_class)
        try:
            variant = layout.request_variant(self._spec, self._params, predictions.shape, targets.shape)
        except layout.NoExportedGraph as exc:
            raise BackendUnavailable(str(exc)) from None
        session = self._backend.session(layout.onnx_file_name(self._spec, variant))
        feeds, restore = layout.to_canonical(self._spec, self._params, predictions, targets, weights)
        _, values, totals, sample_totals, class_totals = session.run(layout.ONNX_OUTPUTS, feeds)
        parts = class_totals if per_class else sample_totals
        return torch.from_numpy(restore(values)), torch.from_numpy(totals), torch.from_numpy(parts)

    def reductions(self, totals: Tensor) -> Tensor:
        return self._library.reductions(totals.cpu())

    def class_reductions(self, class_totals: Tensor) -> Tensor:
        return self._library.class_reductions(class_totals.cpu())


class BackendUnavailable(Exception):
    r"""A valid request that this backend has no artifact for (e.g. an unexported variant)."""


class VariantPending(Exception):
    r"""The request needs an ONNX graph that the background exporter has not written yet.

    ``future`` completes when that export ends (successfully or not); the caller waits for it
    without blocking the event loop and then retries the request.
    """

    def __init__(self, file_name: str, future: "Future[None]") -> None:
        super().__init__(f"ONNX graph {file_name} is being exported")
        self.file_name = file_name
        self.future = future


class PendingGraphs(Protocol):
    r"""What the ONNX backend asks of the background exporter (:class:`.background.VariantExporter`)."""

    def request(self, file_name: str) -> Optional["Future[None]"]: ...


class OnnxBackend(Backend):
    r"""ONNX Runtime sessions, one per exported graph file (``<loss>.onnx`` and its variants).

    ``graphs`` maps a file name to its verified bytes; more arrive through :meth:`add_graph` while
    the server runs (the background exporter). A session is created on the first use of its graph
    (about 30 ms; the start-up smoke check creates those of the default graphs). The execution
    providers come from :func:`loss_service.layout.select_providers` for the server's device (CUDA
    with the device's index, CPU as the fallback); the device a response reports is that of the
    session's first provider.
    """

    name = "onnx"

    def __init__(
        self,
        device: str,
        graphs: Dict[str, bytes],
        explicit_device: bool = False,
        available_providers: Optional[list] = None,
    ) -> None:
        super().__init__(device)
        import onnxruntime

        if available_providers is None:
            available_providers = onnxruntime.get_available_providers()
        # An explicitly requested GPU must be honoured (select_providers raises otherwise); with
        # device=auto a missing CUDAExecutionProvider falls back to CPU.
        on_gpu = self.torch_device.type == "cuda"
        kind = "cpu" if not on_gpu else ("cuda" if explicit_device else "auto")
        names = layout.select_providers(kind, available_providers, gpu_present=on_gpu)
        index = self.torch_device.index or 0
        self.providers = [
            ("CUDAExecutionProvider", {"device_id": index}) if name == "CUDAExecutionProvider" else name
            for name in names
        ]
        self._graphs = dict(graphs)
        self._sessions: Dict[str, Any] = {}
        self._devices: Dict[str, str] = {}
        self._lock = threading.Lock()
        self.pending: Optional[PendingGraphs] = None

    def _has(self, loss: str) -> bool:
        return loss in losses.names() and layout.onnx_file_name(losses.get(loss), {}) in self._graphs

    def add_graph(self, file_name: str, data: bytes) -> None:
        r"""Offer a newly exported graph (checked by ``export.read_verified``); its session is created on first use."""
        with self._lock:
            self._graphs[file_name] = data

    def session(self, file_name: str):
        r"""The session of ``file_name``; raises :class:`VariantPending` while it is being exported."""
        with self._lock:
            session = self._sessions.get(file_name)
            data = self._graphs.get(file_name)
        if session is not None:
            return session
        if data is None:
            future = self.pending.request(file_name) if self.pending is not None else None
            if future is not None:
                raise VariantPending(file_name, future)
            raise BackendUnavailable(f"no exported ONNX graph {file_name}")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # its warnings (constant folding of CastLike) are not actionable
        created = onnxruntime.InferenceSession(data, options, providers=self.providers)
        with self._lock:
            # Two first requests may both create one; the first stored is kept, the other dropped.
            session = self._sessions.setdefault(file_name, created)
            self._devices.setdefault(file_name, provider_device(session.get_providers()[0], self.device))
        return session

    def device_of(self, spec: LossSpec, params: Dict[str, Any]) -> str:
        return self._devices.get(layout.onnx_file_name(spec, {}), "cpu")

    def build(self, spec: LossSpec, params: Dict[str, Any]) -> Runner:
        return OnnxRunner(self, spec, params)
