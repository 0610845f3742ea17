r"""Shared fixtures: ONE export of every artifact per test session, used by the export and server tests.

The session export (``export.export_losses``: every loss, both formats, every ONNX variant,
``standard`` verification, ``--jobs 2`` worker processes, into a temporary folder) runs before the
first test, when some selected test needs it: one that uses ``exported_artifacts``, or
``server_artifacts`` without ``LOSS_SERVICE_TEST_ARTIFACTS``. It takes 2-4 minutes on an idle 2-core
machine and far longer on a busy one, so it is kept out of every per-test timeout (pytest-timeout
times a test together with its fixtures: a test that ran it would time out, and every later one
that needs it would fail with it), and it prints its progress on the terminal. If it fails, the
terminal says why once and each test that needs it fails with that message; it is not run again.

``tests/test_export.py`` checks that export (verification results, manifest, checksums); the server
and client tests serve it. ``server_artifacts`` is the folder the servers use:
``LOSS_SERVICE_TEST_ARTIFACTS`` when set (a prebuilt folder, used as it is), else the shared export.
Tests that need an export of their own (a broken artifact, CLI runs) export a few losses.
"""
import contextlib
import os
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

SESSION_EXPORT_JOBS = 2
SESSION_VERIFY_LEVEL = "standard"
# Far above the export's minutes on a busy machine: past it the export is taken for hung, and
# stopped, rather than left to run into CI's time limit.
SESSION_EXPORT_TIMEOUT_SECONDS = 1800
# How often the terminal hears how far the session export is.
PROGRESS_EVERY_SECONDS = 30
PREBUILT_ARTIFACTS_VARIABLE = "LOSS_SERVICE_TEST_ARTIFACTS"


@dataclass(frozen=True)
class ExportedArtifacts:
    folder: Path
    result: "object"  # export.ExportResult


@dataclass(frozen=True)
class SessionExport:
    r"""The session export's artifacts, or (``artifacts`` None) why there are none: "the session export <failure>"."""

    artifacts: Optional[ExportedArtifacts]
    failure: str = ""


@dataclass(frozen=True)
class ServerArtifacts:
    r"""The folder a test server loads, and whether the server may export into it."""

    folder: Path
    export_missing: bool


_session_export = pytest.StashKey[SessionExport]()


class SessionExportTimedOut(Exception):
    pass


@contextlib.contextmanager
def timed_out_after(seconds: float):
    r"""Raise :class:`SessionExportTimedOut` in the body once it has run ``seconds``.

    SIGALRM is free outside the tests: pytest-timeout arms it only while one runs.
    """
    def out_of_time(signum, frame):
        raise SessionExportTimedOut(f"not finished in {seconds:.0f} s")

    previous_handler = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)


def needs_session_export(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return "exported_artifacts" in fixtures or (
        "server_artifacts" in fixtures and not os.environ.get(PREBUILT_ARTIFACTS_VARIABLE))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item):
    # The outermost wrapper of the first test: before pytest-timeout starts that test's timer.
    if _session_export not in item.config.stash:
        if any(needs_session_export(selected) for selected in item.session.items):
            made = export_for_the_session(item.config)
        else:
            made = SessionExport(None, "was not made: no selected test uses exported_artifacts, "
                                       "or server_artifacts without " + PREBUILT_ARTIFACTS_VARIABLE)
        item.config.stash[_session_export] = made
    yield


def export_for_the_session(config: pytest.Config) -> SessionExport:
    from loss_service import export

    terminal = config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if terminal is not None:
            terminal.write_line(f"export for the test session: {line}")

    folder = Path(tempfile.mkdtemp(prefix="loss-service-test-artifacts-"))
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    say(f"every artifact, {SESSION_EXPORT_JOBS} worker processes, into {folder} "
        f"({PREBUILT_ARTIFACTS_VARIABLE}=<folder> serves a prebuilt one instead)")
    start = last_said = time.monotonic()

    def on_artifact(progress) -> None:
        nonlocal last_said
        now = time.monotonic()
        if now - last_said >= PROGRESS_EVERY_SECONDS:
            say(f"{progress.done}/{progress.total} artifacts, {now - start:.0f} s")
            last_said = now

    try:
        with timed_out_after(SESSION_EXPORT_TIMEOUT_SECONDS):
            result = export.export_losses(folder, verify=SESSION_VERIFY_LEVEL, jobs=SESSION_EXPORT_JOBS,
                                          on_artifact=on_artifact)
    except Exception as error:  # noqa: BLE001 - every test that needs the export reports it
        failure = f"failed after {time.monotonic() - start:.0f} s: {export.error_message(error)}"
        say(f"{failure}\n{traceback.format_exc()}")
        return SessionExport(None, failure)
    failed = [row for row in result.rows if not row.ok]
    say(f"{len(result.rows)} artifacts in {result.seconds:.0f} s, {len(failed)} failed"
        + (f"\n{export.summary_table(failed)}" if failed else ""))
    return SessionExport(ExportedArtifacts(folder, result))


@pytest.fixture(scope="session")
def exported_artifacts(request) -> ExportedArtifacts:
    made = request.config.stash[_session_export]
    if made.artifacts is None:
        pytest.fail(f"the session export {made.failure}", pytrace=False)
    return made.artifacts


@pytest.fixture(scope="session")
def server_artifacts(request) -> ServerArtifacts:
    given = os.environ.get(PREBUILT_ARTIFACTS_VARIABLE)
    if given:
        return ServerArtifacts(Path(given), export_missing=False)
    # A source edit during the session makes the export stale; the server then re-exports.
    return ServerArtifacts(request.getfixturevalue("exported_artifacts").folder, export_missing=True)


def copy_artifacts(source: Path, target: Path, leave_out: Optional[list] = None) -> Path:
    r"""A private copy of an artifacts folder (for tests that change it), without ``leave_out`` files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*(leave_out or [])))
    return target
