r"""The exported artifacts the torchscript and onnx backends load, checked against ``manifest.json``.

The folder is what ``python -m loss_service.export`` writes: ``<loss>.pt``, ``<loss>[--variant].onnx`` and a
``manifest.json`` listing each file with its sha256 and the fingerprint of the sources it was made
from (:func:`loss_service.export.manifest.fingerprint`). An entry is *current* when the manifest was written by
this loss_service/torch/onnx/onnxruntime/numpy, its fingerprint is today's and its file exists;
anything else counts as missing. At start the server

1. exports, in ``jobs`` worker processes, the missing artifacts it needs before readiness: every
   TorchScript module (about 0.1 s each) and every loss's default ONNX graph ``<loss>.onnx``
   (seconds each). An artifact that fails to export is logged and left out: its loss is then not
   offered on that backend (ListLosses ``backends``), while every other loss is;
2. reads each current file once, checks its sha256 against the manifest and that it is the
   artifact its entry and file name say (:func:`read_verified`; either mismatch stops the start),
   and keeps the verified bytes: the backends load from these bytes, so a file swapped after the
   check is never used;
3. returns the missing ONNX *variants* (other structural settings, probability targets, scalar
   alpha) as ``pending``: :class:`.background.VariantExporter` builds them after readiness.

With ``LOSS_SERVICE_MANIFEST_KEY`` set, the manifest must carry a valid HMAC signature
(:func:`export.manifest.check_signature`), else the start stops as well.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from loss_service import layout
from loss_service.losses import LossSpec

from .logs import LOGGER_NAME, event

if TYPE_CHECKING:
    from loss_service.export import Job, Progress

log = logging.getLogger(f"{LOGGER_NAME}.artifacts")
# Exports before readiness skip the exporter's verification to keep a cold start short: the
# start-up smoke check (app.smoke_check) runs each of these artifacts once against eager PyTorch.
# The background exporter verifies the variants ("quick"), and `python -m loss_service.export` runs (image
# builds, CI) do the full verification.
START_VERIFY_LEVEL = "none"


class ArtifactError(RuntimeError):
    r"""An unreadable or unsigned manifest, or an artifact that is not what its manifest entry says
    (checksum, loss, variant)."""


@dataclass
class LoadedArtifacts:
    r"""Verified artifact bytes: ``scripts`` by loss name, ``graphs`` by ONNX file name.

    ``exported``: files written by this start; ``failed``: ``"<file>: <reason>"`` for artifacts
    that are neither present nor exported; ``pending``: ONNX variant files left to the background
    exporter; ``opset``: the ONNX opset of the folder (new exports use it too, so that the
    manifest keeps the graphs already there).
    """

    scripts: Dict[str, bytes] = field(default_factory=dict)
    graphs: Dict[str, bytes] = field(default_factory=dict)
    exported: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    pending: List[str] = field(default_factory=list)
    opset: int = 0


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    r"""``folder``'s manifest (``None`` without one), once its signature is checked (if a key is set)."""
    from loss_service.export import manifest as export_manifest

    path = folder / export_manifest.MANIFEST_NAME
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        export_manifest.check_signature(folder, data)
    except export_manifest.SignatureError as exc:
        raise ArtifactError(str(exc)) from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def current_entries(folder: Path, manifest: Optional[Dict[str, Any]], fingerprint: str) -> Dict[str, Dict[str, Any]]:
    r"""The manifest entries, by file, that can be used as they are (see the module docstring)."""
    from loss_service.export import manifest as export_manifest

    if manifest is None or manifest.get("versions") != export_manifest.versions():
        return {}
    return {
        entry["file"]: entry
        for entry in manifest.get("artifacts", [])
        if entry.get("fingerprint") == fingerprint and (folder / entry["file"]).exists()
    }


def required_files() -> List[str]:
    r"""What readiness needs: every TorchScript module and every loss's default ONNX graph."""
    from loss_service import export

    return [job.file for job in export.plan(all_variants=False)]


def deferred_files() -> List[str]:
    r"""The other ONNX variants, in plan order: exported after readiness."""
    from loss_service import export

    required = set(required_files())
    return [job.file for job in export.plan() if job.file not in required]


def prepare_artifacts(folder: str | Path, export_missing: bool = True, jobs: int = 1) -> LoadedArtifacts:
    r"""Export what readiness needs into ``folder`` (if allowed), then read and verify the current files."""
    from loss_service import export
    from loss_service.export import manifest as export_manifest

    folder = Path(folder)
    fingerprint = export_manifest.fingerprint()
    manifest = read_manifest(folder)
    current = current_entries(folder, manifest, fingerprint)
    missing = [name for name in required_files() if name not in current]
    # The manifest keeps one opset (merging drops ONNX entries of another); follow the folder's.
    opset = manifest.get("opset", export.DEFAULT_OPSET) if current and manifest else export.DEFAULT_OPSET
    loaded = LoadedArtifacts(opset=opset)
    if missing and not export_missing:
        # Not fatal: the losses without artifacts are simply not offered on that backend.
        loaded.failed = [f"{name}: missing or stale" for name in missing]
        log.error("missing artifacts", extra={"fields": {"folder": str(folder), "files": missing,
                                                          "fix": f"python -m loss_service.export --out {folder}"}})
    elif missing:
        event(log, "exporting", folder=str(folder), files=missing, total=len(missing), jobs=jobs)
        start = time.perf_counter()
        result = export.export_losses(folder, opset=opset, verify=START_VERIFY_LEVEL, jobs=jobs, files=missing,
                                      on_artifact=log_progress)
        loaded.failed = [f"{row.file}: {row.error}" for row in result.rows if not row.ok]
        if loaded.failed:
            log.error("export failed", extra={"fields": {"folder": str(folder), "failures": loaded.failed}})
        loaded.exported = [row.file for row in result.rows if row.ok]
        event(log, "exported", folder=str(folder), files=len(result.rows), seconds=round(time.perf_counter() - start, 1))
        current = current_entries(folder, result.manifest, fingerprint)
    for job in export.plan():
        entry = current.get(job.file)
        if entry is None:
            continue
        data = read_verified(folder, entry, job)
        if job.format == "torchscript":
            loaded.scripts[job.spec.name] = data
        else:
            loaded.graphs[job.file] = data
    if export_missing:
        loaded.pending = [name for name in deferred_files() if name not in current]
    return loaded


def read_verified(folder: Path, entry: Dict[str, Any], job: "Job") -> bytes:
    r"""The bytes of ``entry``'s file, once checked to be ``job``'s artifact (the plan's for that file name).

    The entry must name ``job``'s loss, format and variant, the bytes must have the entry's sha256,
    and a graph must be that loss and variant's (:func:`check_graph`). A TorchScript module is
    checked once loaded (:func:`check_scripted`), which the TorchScript backend does anyway.
    """
    path = folder / entry["file"]
    claimed = (entry["loss"], entry["format"], entry["variant_key"])
    planned = (job.spec.name, job.format, layout.variant_key(job.variant))
    if claimed != planned:
        raise ArtifactError(f"{path}: its manifest entry says (loss, format, variant) {claimed}, the file name "
                            f"{planned}{_fix(folder)}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}{_fix(folder)}")
    if job.format == "onnx":
        check_graph(path, entry, job, data)
    return data


def check_graph(path: Path, entry: Dict[str, Any], job: "Job", data: bytes) -> None:
    r"""Raise :class:`ArtifactError` unless ``data`` is the ONNX graph of ``job``'s loss and variant.

    Compared: the loss and variant the exporter wrote into the model metadata
    (:func:`export.artifacts.onnx_identity`; many graphs have the same inputs and outputs); each
    input's name, element type and rank with the feeds the layout makes for that variant
    (:func:`export.artifacts.example_feeds`, i.e. :func:`loss_service.layout.to_canonical`), in
    graph order; the output names with ``layout.ONNX_OUTPUTS``; and the inputs and outputs (names,
    element types, shapes) with those the manifest entry recorded.
    """
    import onnx

    from loss_service.export import manifest as export_manifest
    from loss_service.export.artifacts import example_feeds, onnx_identity

    model = onnx.load_model_from_string(data)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    differences = [
        f"metadata {key} {metadata.get(key)!r}, expected {value!r}"
        for key, value in onnx_identity(job.spec, job.variant).items()
        if metadata.get(key) != value
    ]
    inputs = [export_manifest.value_info(value) for value in model.graph.input]
    outputs = [export_manifest.value_info(value) for value in model.graph.output]
    feeds = example_feeds(job.spec, job.variant)
    names = layout.onnx_input_names(job.spec)
    differences += _differences(
        "inputs",
        [(value["name"], value["dtype"], len(value["shape"])) for value in inputs],
        [(name, feeds[name].numpy().dtype.name, feeds[name].dim()) for name in names],
    )
    differences += _differences("outputs", [value["name"] for value in outputs], layout.ONNX_OUTPUTS)
    for side, found in (("inputs", inputs), ("outputs", outputs)):
        if side in entry:
            differences += _differences(f"{side} vs the manifest entry", _typed_shapes(found), _typed_shapes(entry[side]))
    if differences:
        variant = layout.variant_key(job.variant) or "default variant"
        raise ArtifactError(
            f"{path} is not the ONNX graph of {job.spec.name} ({variant}): {'; '.join(differences)}{_fix(path.parent)}"
        )


def check_scripted(spec: LossSpec, scripted: torch.jit.ScriptModule, configured: torch.nn.Module) -> None:
    r"""Raise :class:`ArtifactError` unless ``scripted`` (a loaded ``<loss>.pt``) is ``spec``'s module.

    Compared with the registry: the TorchScript class (``spec.module``'s qualified name), the methods
    the backend calls (``statistics``, ``reductions``), and every hyperparameter of ``spec`` in the
    form :func:`.backends.configure_scripted` sets it: a buffer where ``configured`` (the eager module
    of ``spec``) has a buffer, else an attribute of the same Python type.
    """
    from loss_service.export.artifacts import torchscript_file_name

    # TorchScript's own naming (``__torch__.<module>.<class>``) on both sides; torch has no public API for it.
    found = scripted._c._type().qualified_name()
    expected = torch._jit_internal._qualified_name(spec.module)
    differences = [f"class {found}, expected {expected}"] if found != expected else []
    differences += [f"no method {name}" for name in ("statistics", "reductions")
                    if not isinstance(getattr(scripted, name, None), torch.ScriptMethod)]
    buffers = dict(scripted.named_buffers(recurse=False))
    eager_buffers = dict(configured.named_buffers(recurse=False))
    for param in spec.params:
        if param.name in eager_buffers:
            if param.name not in buffers:
                differences.append(f"no buffer {param.name}")
            continue
        kind = type(getattr(configured, param.name))
        if not hasattr(scripted, param.name) or type(getattr(scripted, param.name)) is not kind:
            differences.append(f"no {kind.__name__} attribute {param.name}")
    if differences:
        raise ArtifactError(f"{torchscript_file_name(spec)} is not the TorchScript module of {spec.name}: "
                            f"{'; '.join(differences)}{_fix('<the artifacts folder>')}")


def log_progress(progress: "Progress") -> None:
    r"""One log line per artifact of the start-up export: a cold start shows how far it is."""
    fields = {"file": progress.file, "done": progress.done, "total": progress.total,
              "elapsed_seconds": round(progress.seconds, 1)}
    if progress.error:
        log.error("artifact_export_failed", extra={"fields": {**fields, "error": progress.error}})
    else:
        event(log, "artifact_exported", **fields)


def _differences(what: str, found: Sequence[Any], expected: Sequence[Any]) -> List[str]:
    r"""What ``found`` has and ``expected`` lacks and the reverse, or that only their order differs."""
    if list(found) == list(expected):
        return []
    unexpected = [item for item in found if item not in expected]
    missing = [item for item in expected if item not in found]
    if not unexpected and not missing:
        return [f"{what} in another order"]
    return [f"{what}: unexpected {unexpected}, missing {missing}"]


def _typed_shapes(values: Sequence[Dict[str, Any]]) -> List[Tuple[str, str, Tuple[Any, ...]]]:
    r"""``(name, dtype, shape)`` of graph inputs or outputs as :func:`export.manifest.value_info` describes them."""
    return [(value["name"], value["dtype"], tuple(value["shape"])) for value in values]


def _fix(folder: "Path | str") -> str:
    return f"; re-export with `python -m loss_service.export --out {folder}`"
