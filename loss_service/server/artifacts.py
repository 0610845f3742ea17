r"""The exported artifacts the torchscript and onnx backends load, checked against ``manifest.json``.

The folder is what ``python -m export`` writes: ``<loss>.pt``, ``<loss>[--variant].onnx`` and a
``manifest.json`` listing each file with its sha256 and the fingerprint of the sources it was made
from (:func:`export.manifest.fingerprint`). An entry is *current* when the manifest was written by
this loss_service/torch/onnx/onnxruntime/numpy, its fingerprint is today's and its file exists;
anything else counts as missing. At start the server

1. exports, in ``jobs`` worker processes, the missing artifacts it needs before readiness: every
   TorchScript module (about 0.1 s each) and every loss's default ONNX graph ``<loss>.onnx``
   (seconds each). An artifact that fails to export is logged and left out: its loss is then not
   offered on that backend (ListLosses ``backends``), while every other loss is;
2. reads each current file once, checks its sha256 against the manifest (a mismatch stops the
   start) and keeps the verified bytes: the backends load from these bytes, so a file swapped
   after the check is never used;
3. returns the missing ONNX *variants* (other structural settings, probability targets, scalar
   alpha) as ``pending``: :class:`.background.VariantExporter` builds them after readiness.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .logs import LOGGER_NAME, event

log = logging.getLogger(f"{LOGGER_NAME}.artifacts")
MANIFEST_NAME = "manifest.json"
# Exports before readiness skip the exporter's verification to keep a cold start short: the
# start-up smoke check (app.smoke_check) runs each of these artifacts once against eager PyTorch.
# The background exporter verifies the variants ("quick"), and `python -m export` runs (image
# builds, CI) do the full verification.
START_VERIFY_LEVEL = "none"


class ArtifactError(RuntimeError):
    r"""An unreadable manifest, or an artifact whose bytes do not match their manifest checksum."""


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
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def current_entries(folder: Path, manifest: Optional[Dict[str, Any]], fingerprint: str) -> Dict[str, Dict[str, Any]]:
    r"""The manifest entries, by file, that can be used as they are (see the module docstring)."""
    from export import manifest as export_manifest

    if manifest is None or manifest.get("versions") != export_manifest.versions():
        return {}
    return {
        entry["file"]: entry
        for entry in manifest.get("artifacts", [])
        if entry.get("fingerprint") == fingerprint and (folder / entry["file"]).exists()
    }


def required_files() -> List[str]:
    r"""What readiness needs: every TorchScript module and every loss's default ONNX graph."""
    import export

    return [job.file for job in export.plan(all_variants=False)]


def deferred_files() -> List[str]:
    r"""The other ONNX variants, in plan order: exported after readiness."""
    import export

    required = set(required_files())
    return [job.file for job in export.plan() if job.file not in required]


def prepare_artifacts(folder: str | Path, export_missing: bool = True, jobs: int = 1) -> LoadedArtifacts:
    r"""Export what readiness needs into ``folder`` (if allowed), then read and verify the current files."""
    import export
    from export import manifest as export_manifest

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
                                                          "fix": f"python -m export --out {folder}"}})
    elif missing:
        event(log, "exporting", folder=str(folder), files=missing, jobs=jobs)
        start = time.perf_counter()
        result = export.export_losses(folder, opset=opset, verify=START_VERIFY_LEVEL, jobs=jobs, files=missing)
        loaded.failed = [f"{row.file}: {row.error}" for row in result.rows if not row.ok]
        if loaded.failed:
            log.error("export failed", extra={"fields": {"folder": str(folder), "failures": loaded.failed}})
        loaded.exported = [row.file for row in result.rows if row.ok]
        event(log, "exported", folder=str(folder), files=len(result.rows), seconds=round(time.perf_counter() - start, 1))
        current = current_entries(folder, result.manifest, fingerprint)
    for name in required_files() + deferred_files():
        entry = current.get(name)
        if entry is None:
            continue
        data = read_verified(folder, entry)
        if entry["format"] == "torchscript":
            loaded.scripts[entry["loss"]] = data
        else:
            loaded.graphs[name] = data
    if export_missing:
        loaded.pending = [name for name in deferred_files() if name not in current]
    return loaded


def read_verified(folder: Path, entry: Dict[str, Any]) -> bytes:
    r"""The bytes of ``entry``'s file, after checking them against the manifest's sha256."""
    path = folder / entry["file"]
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}; re-export with "
            f"`python -m export --out {folder}`"
        )
    return data
