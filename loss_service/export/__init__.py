r"""``python -m loss_service.export``: TorchScript and ONNX artifacts of every registered loss, verified against eager.

Library use::

    from loss_service.export import export_losses
    result = export_losses(Path("artifacts"), names=["focal"], formats=("onnx",), verify="quick", jobs=2)
    result.ok, result.manifest, result.rows

What a reader of an artifacts folder (the server) uses, all from here: :func:`plan` says which
files there are (:class:`Job`); :func:`fingerprint`, :func:`read_manifest` and
:func:`current_entries` which of them are current; :func:`read_verified` and
:func:`check_scripted` that a file is the artifact it claims to be (:class:`ArtifactError`
otherwise). :func:`export_losses` exports the missing ones; or, one at a time in a worker process
that can be stopped, :func:`process_pool`, :func:`submit` and :func:`terminate`, whose entries
:func:`write_manifest` records (:func:`verification_failures`, :func:`error_message` and
:func:`run_record` describe the outcome).

``jobs > 1`` exports in that many worker processes (spawn context: a fork of a process that has
run torch or ONNX Runtime threads is unsafe); the calling process collects the results and writes
the manifest once. The workers end with the calling process, even when it is killed
(:func:`process_pool`). Generic over the registry: a newly registered loss is exported and verified
with no change here. See docs/export.md for the layout, the manifest and the tolerances.
"""
from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (_terminate_pools_at_exit)
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

from loss_service import layout, losses
from loss_service.losses import LossSpec

from . import manifest as manifest_module
from .artifacts import DEFAULT_OPSET, export_onnx, export_torchscript, quiet, torchscript_file_name
from .folder import ArtifactError, check_scripted, current_entries, read_manifest, read_verified
from .manifest import MANIFEST_NAME, fingerprint, run_record
from .manifest import write as write_manifest
from .verify import LEVELS, run_checks, verify_onnx, verify_torchscript

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


@dataclass(frozen=True)
class Progress:
    r"""One artifact finished (exported or failed) during :func:`export_losses`: the ``done``-th of
    ``total``, ``seconds`` after the run began; ``error`` is empty when it succeeded."""

    file: str
    done: int
    total: int
    seconds: float
    error: str = ""


class ExportInterrupted(RuntimeError):
    r"""The process began to exit during :func:`export_losses`, which stopped and wrote no manifest.

    Its worker processes were terminated; an export running in the calling process was let finish.
    """


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


def default_jobs() -> int:
    r"""Worker processes used by default: two, or one on a single-core machine.

    A dynamo export is one busy Python thread, so more workers than cores only adds contention.
    """
    return min(2, os.cpu_count() or 1)


def run_job(
    job: Job, out: Path, opset: int, verify: str, device: str, source_fingerprint: Optional[str] = None
) -> Dict[str, Any]:
    r"""Write one artifact, reload and verify it; the manifest entry (raises if the export fails).

    ``source_fingerprint`` (default: computed now) is recorded in the entry; a run passes the one
    it computed at its start, so every entry of a run agrees.
    """
    path = out / job.file
    if job.format == "torchscript":
        export_torchscript(job.spec, path)
        entry = manifest_module.torchscript_entry(job.spec, path)
        check = lambda: verify_torchscript(job.spec, path, verify)  # noqa: E731
    else:
        export_onnx(job.spec, job.variant, path, opset)
        strip_object_addresses(path)
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
    return manifest_module.finish_entry(entry, path, verification, source_fingerprint or fingerprint())


_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def strip_object_addresses(path: Path) -> None:
    r"""Remove memory addresses (``<function sym_float at 0x7f...>``) from the graph's node metadata.

    The dynamo exporter records the repr of some traced callables in each node's
    ``metadata_props``; the address differs from one process to the next, so without this the
    bytes (and sha256) of a graph depend on which worker process exported it. The rest of the
    debugging metadata (stack traces, FX node names) is kept.
    """
    import onnx

    model = onnx.load(str(path))
    changed = False
    for node in list(model.graph.node) + [node for function in model.functions for node in function.node]:
        for prop in node.metadata_props:
            cleaned = _OBJECT_ADDRESS.sub(">", prop.value)
            if cleaned != prop.value:
                prop.value, changed = cleaned, True
    if changed:
        tmp = path.with_suffix(path.suffix + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)


def job_key(job: Job) -> Tuple[str, str, Dict[str, Any], str]:
    r"""What a worker process needs to rebuild ``job`` (a LossSpec holds functions; names pickle)."""
    return job.spec.name, job.format, job.variant, job.file


def _worker_start(parent_pid: int) -> None:
    end_with_parent(parent_pid)
    import torch

    # One export per core: intra-op threads of several workers would fight over the same cores.
    torch.set_num_threads(1)


# Linux's <sys/prctl.h>: PR_SET_PDEATHSIG, the signal this process gets when its parent ends.
_PR_SET_PDEATHSIG = 1
# Where the kernel cannot signal it, how often a worker looks whether its parent is still there.
PARENT_POLL_SECONDS = 1.0


def end_with_parent(parent_pid: int) -> None:
    r"""End this process when its parent ``parent_pid`` ends, even by SIGKILL (which runs no clean-up there).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``. The kernel sends it when the *thread* that started
    this process ends, not when the whole parent process does: see :func:`process_pool` for which
    thread that is. Elsewhere, or if prctl fails: a daemon thread polls ``os.getppid()``. Either way
    a parent that ended before this call is caught at once: this process has been re-parented.
    """
    signalled = False
    if sys.platform.startswith("linux"):
        import ctypes

        # prctl is variadic and reads its second argument as an unsigned long: pass one.
        signalled = ctypes.CDLL(None).prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL)) == 0
    if not signalled:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _run_job_in_worker(
    key: Tuple[str, str, Dict[str, Any], str], out: Path, opset: int, verify: str, device: str, source_fingerprint: str
) -> Tuple[Optional[Dict[str, Any]], str, float]:
    r"""``run_job`` in a worker process: ``(entry, "", seconds)``, or ``(None, message, seconds)``.

    Failures come back as text: exceptions from torch.export or ONNX are not always picklable.
    """
    name, fmt, variant, file = key
    start = time.perf_counter()
    try:
        entry = run_job(Job(losses.get(name), fmt, variant, file), out, opset, verify, device, source_fingerprint)
    except Exception as error:  # noqa: BLE001 - reported per artifact by the caller
        return None, error_message(error), time.perf_counter() - start
    return entry, "", time.perf_counter() - start


def error_message(error: BaseException) -> str:
    r"""``"<Type>: <first line of the message>"`` for the summary table."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def process_pool(workers: int) -> ProcessPoolExecutor:
    r"""Export worker processes (spawn context, one torch thread each) that end with this process.

    A worker ends when this process does, even by SIGKILL (:func:`end_with_parent`); on Linux it
    ends as soon as the *thread* that started it ends. Python 3.11's ProcessPoolExecutor starts
    spawn workers in :meth:`~ProcessPoolExecutor.submit`, in the calling thread (its management
    thread starts some only with ``max_tasks_per_child``, not used here): so make the pool, submit
    to it and wait for its results in one thread that lives until the pool is shut down.

    At interpreter exit the workers are terminated (:func:`terminate`) before concurrent.futures
    joins its threads, so that the exit does not wait for the exports in progress.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_start, initargs=(os.getpid(),))
    with _pools_lock:
        _live_pools.add(pool)
    return pool


def terminate(pool: ProcessPoolExecutor) -> None:
    r"""End ``pool``'s worker processes now (thread-safe; call it before ``pool.shutdown``, which forgets them).

    The exports in progress are lost and every pending future fails with BrokenProcessPool.
    ProcessPoolExecutor has no public terminate before Python 3.14; ``shutdown(cancel_futures=True)``
    still waits for (or leaves running) the calls its workers have taken.
    """
    for worker in list((pool._processes or {}).values()):
        worker.terminate()


def _terminate_pools_at_exit() -> None:
    global _exiting
    _exiting = True
    with _pools_lock:
        pools = list(_live_pools)
    for pool in pools:
        terminate(pool)


# The pools of process_pool still referenced: the exit hook terminates their workers.
_live_pools: "weakref.WeakSet[ProcessPoolExecutor]" = weakref.WeakSet()
_pools_lock = threading.Lock()
# Set by the exit hook: export_losses then stops, reporting its cut-short run as an error, not as failed artifacts.
_exiting = False
# Threading runs these hooks before it joins the non-daemon threads, in the reverse order of
# registration: this one before concurrent.futures' (imported above), which join the executors'
# threads and the pools' management threads, i.e. wait for the exports in progress.
threading._register_atexit(_terminate_pools_at_exit)  # type: ignore[attr-defined]


def submit(
    pool: ProcessPoolExecutor, job: Job, out: Path, opset: int, verify: str, device: str, source_fingerprint: str
) -> "Future[Tuple[Optional[Dict[str, Any]], str, float]]":
    r"""Export ``job`` in ``pool``; the result is ``(entry, "", seconds)`` or ``(None, error message, seconds)``."""
    return pool.submit(_run_job_in_worker, job_key(job), out, opset, verify, device, source_fingerprint)


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
        failures = verification_failures(entry)
        if failures:
            row.ok, row.error = False, failures
    return row


def verification_failures(entry: Dict[str, Any]) -> str:
    r"""The failed checks of a manifest entry's verification, ``"<check>: <first failures>; ..."``;
    empty when it passed."""
    verification = entry.get("verification")
    if verification is None or verification["passed"]:
        return ""
    return "; ".join(f"{c['name']}: {', '.join(c['failures'][:2])}" for c in verification["checks"] if not c["passed"])


def export_losses(
    out: Path,
    names: Optional[Sequence[str]] = None,
    formats: Sequence[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    verify: str = "standard",
    device: str = "auto",
    progress: bool = False,
    all_variants: bool = True,
    jobs: int = 1,
    files: Optional[Collection[str]] = None,
    on_artifact: Optional[Callable[[Progress], None]] = None,
) -> ExportResult:
    r"""Export (and verify) the artifacts into ``out`` and write ``out/manifest.json``.

    ``files`` keeps only those artifact files of the plan (the server exports just what is missing).
    ``progress`` shows a tqdm bar on stderr; ``on_artifact(Progress)`` is called in the calling
    process each time an artifact is finished, for a caller that reports progress its own way.
    ``jobs`` worker processes export concurrently; with ``jobs=1`` (or a single artifact) everything
    runs in the calling process. The manifest is written once, by the calling process, at the end.

    A failure to export or verify any artifact makes ``result.ok`` false; the failing artifact is
    reported in ``result.rows`` with its error (its file is not listed in the manifest). An exit of
    the process during the run (e.g. the server's SIGTERM) raises :class:`ExportInterrupted`.
    """
    if verify not in LEVELS:
        raise ValueError(f"verify must be one of {', '.join(LEVELS)}, got '{verify}'")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    start = time.perf_counter()
    planned = _planned(names, formats, all_variants, files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source_fingerprint = fingerprint()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(planned), file=sys.stderr, unit="artifact", dynamic_ncols=True)
    results: Dict[str, Tuple[Optional[Dict[str, Any]], str, float]] = {}

    def finished(job: Job, outcome: Tuple[Optional[Dict[str, Any]], str, float]) -> None:
        results[job.file] = outcome
        if bar is not None:
            bar.update(1)
        if on_artifact is not None:
            on_artifact(Progress(job.file, len(results), len(planned), time.perf_counter() - start, outcome[1]))

    workers = min(jobs, len(planned))
    arguments = (out, opset, verify, device, source_fingerprint)
    if workers <= 1:
        _export_here(planned, arguments, finished, bar)
    else:
        _export_in_workers(planned, arguments, finished, bar, workers)
    if _exiting:
        raise ExportInterrupted("the process is exiting: the export was stopped")
    if bar is not None:
        bar.close()
    entries: List[Dict[str, Any]] = []
    rows: List[Row] = []
    for job in planned:
        entry, error, seconds = results[job.file]
        if entry is None:
            rows.append(_row(job, None, seconds, error))
            (out / job.file).unlink(missing_ok=True)
            continue
        row = _row(job, entry, seconds)
        rows.append(row)
        if row.ok:
            entries.append(entry)
    seconds = time.perf_counter() - start
    run = run_record(seconds, verify, workers, [row.file for row in rows if not row.ok])
    written = write_manifest(out, entries, opset, run, source_fingerprint)
    return ExportResult(all(row.ok for row in rows), rows, written, seconds)


def _planned(
    names: Optional[Sequence[str]], formats: Sequence[str], all_variants: bool, files: Optional[Collection[str]]
) -> List[Job]:
    r""":func:`plan`, kept to ``files`` when given (``ValueError`` naming the files it does not have)."""
    planned = plan(names, formats, all_variants)
    if files is None:
        return planned
    unknown = sorted(set(files) - {job.file for job in planned})
    if unknown:
        raise ValueError(f"files {unknown} are not artifacts of this plan; expected some of "
                         f"{', '.join(job.file for job in planned)}")
    return [job for job in planned if job.file in files]


Finished = Callable[[Job, Tuple[Optional[Dict[str, Any]], str, float]], None]


def _export_here(planned: Sequence[Job], arguments: Tuple[Any, ...], finished: Finished, bar: Any) -> None:
    r"""Export the jobs one after another in this process (``arguments``: those of :func:`run_job` after the job)."""
    for job in planned:
        if _exiting:
            break  # an export in this process cannot be cut short: stop between two
        if bar is not None:
            bar.set_description(job.file)
        job_start = time.perf_counter()
        try:
            entry, error = run_job(job, *arguments), ""
        except Exception as failure:  # noqa: BLE001 - reported per artifact, and the run fails
            entry, error = None, error_message(failure)
        finished(job, (entry, error, time.perf_counter() - job_start))


def _export_in_workers(
    planned: Sequence[Job], arguments: Tuple[Any, ...], finished: Finished, bar: Any, workers: int
) -> None:
    r"""Export the jobs in ``workers`` processes (:func:`process_pool`), reporting each as it finishes."""
    # Longest first: region-loss graphs (7-15 s here), other graphs (~5 s), then TorchScript
    # modules (~0.1 s), so the short jobs fill the gaps at the end instead of a core idling.
    ordered = sorted(planned, key=lambda job: (job.format != "onnx", job.spec.kind != "region"))
    with process_pool(workers) as pool:
        try:
            submitted = {submit(pool, job, *arguments): job for job in ordered}
            for future in as_completed(submitted):
                job = submitted[future]
                try:
                    outcome = future.result()
                except Exception as failure:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                    outcome = (None, error_message(failure), 0.0)
                if bar is not None:
                    bar.set_description(job.file)
                finished(job, outcome)
        except BaseException:
            # E.g. Ctrl-C: leaving the `with` would wait for every export still queued.
            terminate(pool)
            raise


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


__all__ = ["export_losses", "plan", "summary_table", "default_jobs", "process_pool", "terminate", "end_with_parent",
           "submit", "error_message", "verification_failures", "ExportResult", "Progress", "ExportInterrupted", "Row",
           "Job", "FORMATS", "DEFAULT_OPSET", "LEVELS", "MANIFEST_NAME", "fingerprint", "read_manifest",
           "current_entries", "read_verified", "check_scripted", "ArtifactError", "write_manifest", "run_record"]
