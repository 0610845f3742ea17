r"""The exported artifacts the torchscript and onnx backends load, checked against ``manifest.json``.

The folder is what ``python -m loss_service.export`` writes: ``<loss>.pt``, ``<loss>[--variant].onnx``
and a ``manifest.json`` listing each file with its sha256 and the fingerprint of what it was made
from; the exporter's API (:mod:`loss_service.export`) says which entries are current and reads
verified bytes. At start the server

1. exports, in ``jobs`` worker processes, the missing (or stale) artifacts it needs before
   readiness: every TorchScript module (about 0.1 s each) and every loss's default ONNX graph
   ``<loss>.onnx`` (seconds each). An artifact that fails to export is logged and left out: its
   loss is then not offered on that backend (ListLosses ``backends``), while every other loss is;
2. reads each current file once, checks its sha256 against the manifest and that it is the
   artifact its entry and file name say (:func:`loss_service.export.read_verified`; either
   mismatch stops the start), and keeps the verified bytes: the backends load from these bytes, so
   a file swapped after the check is never used;
3. returns the missing ONNX *variants* (other structural settings, probability targets, scalar
   alpha) as ``pending``: :class:`.background.VariantExporter` builds them after readiness.

With ``LOSS_SERVICE_MANIFEST_KEY`` set, the manifest must carry a valid HMAC signature, else the
start stops as well.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from loss_service import export

from .logs import LOGGER_NAME, event

log = logging.getLogger(f"{LOGGER_NAME}.artifacts")
# Exports before readiness skip the exporter's verification to keep a cold start short: the
# start-up smoke check (app.smoke_check) runs each of these artifacts once against eager PyTorch.
# The background exporter verifies the variants ("quick"), and `python -m loss_service.export` runs (image
# builds, CI) do the full verification.
START_VERIFY_LEVEL = "none"


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


def required_files() -> List[str]:
    r"""What readiness needs: every TorchScript module and every loss's default ONNX graph."""
    return [job.file for job in export.plan(all_variants=False)]


def deferred_files() -> List[str]:
    r"""The other ONNX variants, in plan order: exported after readiness."""
    required = set(required_files())
    return [job.file for job in export.plan() if job.file not in required]


def prepare_artifacts(folder: str | Path, export_missing: bool = True, jobs: int = 1) -> LoadedArtifacts:
    r"""Export what readiness needs into ``folder`` (if allowed), then read and verify the current files."""
    folder = Path(folder)
    fingerprint = export.fingerprint()
    manifest = export.read_manifest(folder)
    current = export.current_entries(folder, manifest, fingerprint)
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
        current = export.current_entries(folder, result.manifest, fingerprint)
    for job in export.plan():
        entry = current.get(job.file)
        if entry is None:
            continue
        data = export.read_verified(folder, entry, job)
        if job.format == "torchscript":
            loaded.scripts[job.spec.name] = data
        else:
            loaded.graphs[job.file] = data
    if export_missing:
        loaded.pending = [name for name in deferred_files() if name not in current]
    return loaded


def log_progress(progress: export.Progress) -> None:
    r"""One log line per artifact of the start-up export: a cold start shows how far it is."""
    fields = {"file": progress.file, "done": progress.done, "total": progress.total,
              "elapsed_seconds": round(progress.seconds, 1)}
    if progress.error:
        log.error("artifact_export_failed", extra={"fields": {**fields, "error": progress.error}})
    else:
        event(log, "artifact_exported", **fields)
