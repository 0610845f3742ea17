r"""The exported artifacts the torchscript and onnx backends load, checked against ``manifest.json``.

The folder is what ``python -m export`` writes: ``<loss>.pt``, ``<loss>[--variant].onnx`` and a
``manifest.json`` listing each file with its sha256. At start the server

1. exports whatever is missing (every registered loss in both formats, by the manifest) through
   :func:`export.export_losses` -- also everything when the manifest was written by other library
   versions, since artifacts are tied to the torch/onnx versions that made them;
   An artifact that fails to export is logged and left out: its loss is then not offered on that
   backend (ListLosses ``backends``), while every other loss is;
2. reads each listed file once, checks its sha256 against the manifest and keeps the verified
   bytes (the backends load from these bytes, so a file swapped after the check is never used).
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
# Exports made at start skip the exporter's verification: the server's own start-up check compares
# every loaded artifact with eager PyTorch (app.warm_up), and a cold start must stay short. The
# full verification belongs to `python -m export` runs (image builds, CI).
START_VERIFY_LEVEL = "none"


class ArtifactError(RuntimeError):
    r"""Artifacts that are missing (and may not be exported), fail to export, or fail their checksum."""


@dataclass
class LoadedArtifacts:
    r"""Verified artifact bytes: ``scripts`` by loss name, ``graphs`` by ONNX file name."""

    scripts: Dict[str, bytes] = field(default_factory=dict)
    graphs: Dict[str, bytes] = field(default_factory=dict)
    exported: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def missing_files(folder: Path, manifest: Optional[Dict[str, Any]]) -> List[str]:
    r"""Expected artifact files (every registered loss, both formats) absent from the manifest or disk."""
    import export
    from export import manifest as export_manifest

    expected = [job.file for job in export.plan()]
    if manifest is None or manifest.get("versions") != export_manifest.versions():
        return expected
    listed = {entry["file"] for entry in manifest.get("artifacts", [])}
    return [name for name in expected if name not in listed or not (folder / name).exists()]


def prepare_artifacts(folder: str | Path, export_missing: bool = True) -> LoadedArtifacts:
    r"""Export missing artifacts into ``folder`` (if allowed), then read and verify every listed file."""
    import export

    folder = Path(folder)
    manifest = read_manifest(folder)
    missing = missing_files(folder, manifest)
    exported: List[str] = []
    failed: List[str] = []
    if missing and not export_missing:
        # Not fatal: the losses without artifacts are simply not offered on that backend.
        failed = [f"{name}: missing" for name in missing]
        log.error("missing artifacts", extra={"fields": {"folder": str(folder), "files": missing,
                                                          "fix": f"python -m export --out {folder}"}})
    elif missing:
        losses_to_export = sorted({job.spec.name for job in export.plan() if job.file in missing})
        event(log, "exporting", folder=str(folder), losses=losses_to_export, files=len(missing))
        start = time.perf_counter()
        result = export.export_losses(folder, names=losses_to_export, verify=START_VERIFY_LEVEL)
        failed = [f"{row.file}: {row.error}" for row in result.rows if not row.ok]
        if failed:
            log.error("export failed", extra={"fields": {"folder": str(folder), "failures": failed}})
        event(log, "exported", folder=str(folder), files=len(result.rows), seconds=round(time.perf_counter() - start, 1))
        exported = [row.file for row in result.rows if row.ok]
        manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; run `python -m export --out {folder}`")
    loaded = LoadedArtifacts(exported=exported, failed=failed)
    for entry in manifest.get("artifacts", []):
        path = folder / entry["file"]
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}; re-export with "
                f"`python -m export --out {folder}`"
            )
        if entry["format"] == "torchscript":
            loaded.scripts[entry["loss"]] = data
        elif entry["format"] == "onnx":
            loaded.graphs[entry["file"]] = data
    return loaded
