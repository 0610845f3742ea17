r"""``python -m export``: TorchScript and ONNX artifacts of every registered loss, verified against eager.

Library use (the server exports missing artifacts at start-up)::

    from export import export_losses
    result = export_losses(Path("artifacts"), names=["focal"], formats=("onnx",), verify="quick")
    result.ok, result.manifest, result.rows

Generic over the registry: a newly registered loss is exported and verified with no change here.
See docs/export.md for the layout, the manifest and the tolerances.
"""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from loss_service import layout, losses
from loss_service.losses import LossSpec

from . import manifest as manifest_module
from .artifacts import DEFAULT_OPSET, export_onnx, export_torchscript, quiet, torchscript_file_name
from .verify import LEVELS, Check, run_checks, verify_onnx, verify_torchscript

FORMATS = ("torchscript", "onnx")


@dataclass
class Job:
    r"""One artifact to write: a loss in one format (and, for ONNX, one variant)."""

    spec: LossSpec
    format: str
    variant: Dict[str, Any]
    file: str


@dataclass
class Row:
    r"""One line of the summary table."""

    file: str
    loss: str
    format: str
    ok: bool
    size_bytes: int = 0
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class ExportResult:
    ok: bool
    rows: List[Row] = field(default_factory=list)
    manifest: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def plan(
    names: Optional[Sequence[str]] = None, formats: Sequence[str] = FORMATS, all_variants: bool = True
) -> List[Job]:
    r"""The artifacts of ``names`` (every registered loss when ``None``) in ``formats``.

    ``all_variants=False`` keeps only each loss's default ONNX graph (``<loss>.onnx``).

    Raises ``ValueError`` naming an unknown loss or format and listing the valid ones.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    specs = [losses.get(name) for name in names] if names else losses.specs()
    jobs: List[Job] = []
    seen = set()
    for spec in specs:
        if spec.name in seen:
            continue
        seen.add(spec.name)
        if "torchscript" in formats:
            jobs.append(Job(spec, "torchscript", {}, torchscript_file_name(spec)))
        if "onnx" in formats:
            for variant in layout.variants(spec) if all_variants else layout.variants(spec)[:1]:
                jobs.append(Job(spec, "onnx", variant, layout.onnx_file_name(spec, variant)))
    return jobs


def run_job(job: Job, out: Path, opset: int, verify: str, device: str) -> Dict[str, Any]:
    r"""Write one artifact, reload and verify it; the manifest entry (raises if the export fails)."""
    path = out / job.file
    if job.format == "torchscript":
        export_torchscript(job.spec, path)
        entry = manifest_module.torchscript_entry(job.spec, path)
        check = lambda: verify_torchscript(job.spec, path, verify)  # noqa: E731
    else:
        export_onnx(job.spec, job.variant, path, opset)
        entry = manifest_module.onnx_entry(job.spec, job.variant, path, opset)
        check = lambda: verify_onnx(job.spec, job.variant, path, verify, device)  # noqa: E731
    verification = None
    if verify != "none":
        with quiet():
            checks = run_checks(check)
        verification = {
            "level": verify,
            "passed": all(c.passed for c in checks),
            "tolerances": _tolerances(),
            "checks": [c.as_dict() for c in checks],
        }
    return manifest_module.finish_entry(entry, path, verification)


def _tolerances() -> Dict[str, float]:
    from . import verify as v

    return {"rtol": v.RTOL, "atol": v.ATOL, "accuracy_rtol": v.ACCURACY_RTOL, "accuracy_elements": v.ACCURACY_ELEMENTS}


def _row(job: Job, entry: Optional[Dict[str, Any]], seconds: float, error: str = "") -> Row:
    row = Row(job.file, job.spec.name, job.format, ok=entry is not None and not error, seconds=seconds, error=error)
    if entry is None:
        return row
    row.size_bytes = entry["size_bytes"]
    verification = entry.get("verification")
    if verification is not None:
        checks = [c for c in verification["checks"] if c["name"] not in ("onnx_checker", "float64_accumulation")]
        row.max_abs_error = max((c["max_abs_error"] for c in checks), default=0.0)
        row.max_rel_error = max((c["max_rel_error"] for c in checks), default=0.0)
        if not verification["passed"]:
            row.ok = False
            failed = [c for c in verification["checks"] if not c["passed"]]
            row.error = "; ".join(f"{c['name']}: {', '.join(c['failures'][:2])}" for c in failed)
    return row


def export_losses(
    out: Path,
    names: Optional[Sequence[str]] = None,
    formats: Sequence[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    verify: str = "standard",
    device: str = "auto",
    progress: bool = False,
    all_variants: bool = True,
) -> ExportResult:
    r"""Export (and verify) the artifacts into ``out`` and write ``out/manifest.json``.

    A failure to export or verify any artifact makes ``result.ok`` false; the failing artifact is
    reported in ``result.rows`` with its error (its file is not listed in the manifest).
    """
    if verify not in LEVELS:
        raise ValueError(f"verify must be one of {', '.join(LEVELS)}, got '{verify}'")
    start = time.perf_counter()
    jobs = plan(names, formats, all_variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: List[Dict[str, Any]] = []
    rows: List[Row] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), file=sys.stderr, unit="artifact", dynamic_ncols=True)
    for job in jobs:
        if bar is not None:
            bar.set_description(job.file)
        job_start = time.perf_counter()
        try:
            entry = run_job(job, out, opset, verify, device)
        except Exception as error:  # noqa: BLE001 - reported per artifact, and the run fails
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            rows.append(_row(job, None, time.perf_counter() - job_start, message))
            (out / job.file).unlink(missing_ok=True)
        else:
            row = _row(job, entry, time.perf_counter() - job_start)
            rows.append(row)
            if row.ok:
                entries.append(entry)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    run = {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "verify": verify,
        "failed": sorted(row.file for row in rows if not row.ok),
    }
    written = manifest_module.write(out, entries, opset, run)
    return ExportResult(all(row.ok for row in rows), rows, written, seconds)


def summary_table(rows: Sequence[Row]) -> str:
    r"""The end-of-run table: artifact, size, verified max abs/rel error, status."""
    header = ("artifact", "format", "size", "max abs err", "max rel err", "time", "status")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.file,
                row.format,
                _size(row.size_bytes) if row.size_bytes else "-",
                "-" if row.max_abs_error is None else f"{row.max_abs_error:.2e}",
                "-" if row.max_rel_error is None else f"{row.max_rel_error:.2e}",
                f"{row.seconds:.1f}s",
                "ok" if row.ok else "FAILED",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    for row in rows:
        if not row.ok:
            text.append(f"FAILED {row.file}: {row.error}")
    return "\n".join(text)


def _size(size: int) -> str:
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} B"


__all__ = ["export_losses", "plan", "summary_table", "ExportResult", "Row", "Job", "FORMATS", "DEFAULT_OPSET", "LEVELS"]
