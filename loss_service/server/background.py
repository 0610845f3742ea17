r"""Exporting the ONNX variants after readiness, one at a time, the requested ones first.

Readiness needs only each loss's default ONNX graph; the other variants (e.g.
``dice--mode=multiclass.onnx``, ``focal--alpha=scalar.onnx``) take seconds each to export, so
:class:`VariantExporter` builds them on a background thread once the server is SERVING:

* one export at a time, in one worker process (spawn context), so that at least one core of a
  2-core machine stays with the requests;
* each graph is verified (``quick``: parity with eager PyTorch on one input set), then its entry is
  merged into ``manifest.json`` (atomic rename; this thread is the manifest's only writer after
  start-up), then its checksum-verified bytes go to the ONNX backend;
* a request for a variant that is not built yet moves it to the front of the queue and waits for
  it (:class:`.backends.VariantPending`); a variant whose export or verification fails is logged
  and its requests get ``FAILED_PRECONDITION``.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, TimeoutError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Dict, List, Optional

from loss_service import export

from .backends import BackendUnavailable
from .logs import LOGGER_NAME, event

log = logging.getLogger(f"{LOGGER_NAME}.background")
BACKGROUND_VERIFY_LEVEL = "quick"
# How often the exporter thread, waiting for its worker, looks whether the server is stopping.
STOP_POLL_SECONDS = 0.2
# The most stop() waits for the exporter thread: it ends within STOP_POLL_SECONDS of the
# terminated worker, unless it is writing the manifest.
STOP_JOIN_SECONDS = 2.0


class VariantExporter:
    r"""Exports ``files`` (ONNX variant file names of ``export.plan()``) into ``folder``.

    ``deliver(file_name, data)`` receives each exported graph's verified bytes (the ONNX backend's
    ``add_graph``). :meth:`request` is thread-safe; :meth:`stop` ends the worker process at once.
    """

    def __init__(self, folder: Path, files: List[str], deliver: Callable[[str, bytes], None], opset: int) -> None:
        self.folder = Path(folder)
        self.opset = opset
        self._jobs = {job.file: job for job in export.plan() if job.file in set(files)}
        unknown = sorted(set(files) - set(self._jobs))
        if unknown:
            raise ValueError(f"files {unknown} are not ONNX variants of export.plan()")
        self._queue: List[str] = list(files)
        self._futures: Dict[str, "Future[None]"] = {file: Future() for file in files}
        self._deliver = deliver
        self._lock = threading.Lock()
        self._stopping = False
        # The worker pool, made and used by the exporter thread (its worker ends with that thread).
        self._pool: Optional[ProcessPoolExecutor] = None
        self._thread = threading.Thread(target=self._run, name="variant-exporter", daemon=True)
        self.exported: List[str] = []
        self.failed: Dict[str, str] = {}

    def start(self) -> None:
        self._thread.start()

    def request(self, file_name: str) -> Optional["Future[None]"]:
        r"""The future of ``file_name``'s export, moved to the front of the queue; ``None`` if not pending."""
        with self._lock:
            future = self._futures.get(file_name)
            if future is not None and file_name in self._queue:
                self._queue.remove(file_name)
                self._queue.insert(0, file_name)
            return future

    def pending(self) -> List[str]:
        with self._lock:
            return list(self._futures)

    def wait(self, timeout: Optional[float] = None) -> bool:
        r"""Block until every export has ended (tests, tools); ``False`` on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        r"""Drop the queue, end the worker process at once (its export in progress is lost), and fail
        every waiting request."""
        with self._lock:
            self._stopping = True
            self._queue.clear()
            pool = self._pool
        if pool is not None:
            export.terminate(pool)
        if self._thread.ident is not None:
            self._thread.join(STOP_JOIN_SECONDS)
        with self._lock:
            futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(BackendUnavailable("the server is shutting down"))

    def _stopped(self) -> bool:
        with self._lock:
            return self._stopping

    def _next(self) -> Optional[str]:
        with self._lock:
            if self._stopping or not self._queue:
                return None
            return self._queue.pop(0)

    def _run(self) -> None:
        fingerprint = export.fingerprint()
        started = time.perf_counter()
        pool = self._new_pool()
        event(log, "background_export_started", files=len(self._queue))
        try:
            while (file_name := self._next()) is not None:
                job_start = time.perf_counter()
                submitted = export.submit(pool, self._jobs[file_name], self.folder, self.opset, BACKGROUND_VERIFY_LEVEL,
                                          "auto", fingerprint)
                while True:
                    try:
                        entry, error, _ = submitted.result(timeout=STOP_POLL_SECONDS)
                        break
                    except TimeoutError:
                        if self._stopped():
                            return
                    except Exception as failure:  # noqa: BLE001 - a dead worker fails this export
                        entry, error = None, export.error_message(failure)
                        if isinstance(failure, BrokenProcessPool):
                            # The worker died (e.g. killed for memory): the next exports get a new one.
                            pool.shutdown(wait=False)
                            pool = self._new_pool()
                        break
                failures = export.verification_failures(entry) if entry is not None else ""
                if failures:
                    entry, error = None, failures
                self._finish(file_name, entry, error, fingerprint, time.perf_counter() - job_start)
        finally:
            if self._stopped():
                # stop() may have come before this thread's submit started the worker; without this
                # the process exit would wait for the export in progress, seconds to a minute.
                export.terminate(pool)
            # Waits for an idle or terminated worker only (milliseconds), and must: the worker is
            # killed when this thread ends (export.process_pool), which would break a shutdown in progress.
            pool.shutdown(wait=True, cancel_futures=True)
            event(log, "background_export_finished", exported=len(self.exported), failed=sorted(self.failed),
                  seconds=round(time.perf_counter() - started, 1))

    def _new_pool(self) -> ProcessPoolExecutor:
        r"""A worker pool for this thread's exports, which :meth:`stop` can terminate."""
        pool = export.process_pool(1)
        with self._lock:
            self._pool = pool
        return pool

    def _finish(self, file_name: str, entry, error: str, fingerprint: str, seconds: float) -> None:
        with self._lock:
            if self._stopping:
                return
        if entry is not None:
            try:
                run = export.run_record(seconds, BACKGROUND_VERIFY_LEVEL, jobs=1, failed=[])
                export.write_manifest(self.folder, [entry], self.opset, run, fingerprint)
                data = export.read_verified(self.folder, entry, self._jobs[file_name])
            except Exception as failure:  # noqa: BLE001 - e.g. a full disk: this variant is not offered
                entry, error = None, f"{type(failure).__name__}: {failure}"
            else:
                # The graph is offered before the future completes: a waiting request retries at once.
                self._deliver(file_name, data)
        with self._lock:
            future = self._futures.pop(file_name, None)
        if future is None:  # stop() has failed it already
            return
        if entry is None:
            (self.folder / file_name).unlink(missing_ok=True)
            self.failed[file_name] = error
            log.error("variant export failed", extra={"fields": {"file": file_name, "error": error}})
            future.set_exception(BackendUnavailable(f"exporting {file_name} failed: {error}"))
            return
        self.exported.append(file_name)
        event(log, "variant_exported", file=file_name, seconds=round(seconds, 1))
        future.set_result(None)
