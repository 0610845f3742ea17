r"""The session export of ``tests/conftest.py``: once, before the tests and outside their timeouts, only when needed.

Each test runs an inner pytest session (pytester, in this process) with a copy of that conftest and
``export.export_losses`` replaced by a fake that takes a set time, so no artifact is exported.
"""
import time
from pathlib import Path

import pytest

from loss_service import export

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
INNER_TESTS = """
def test_without_artifacts():
    pass

def test_exported(exported_artifacts):
    assert exported_artifacts.result.ok

def test_served(server_artifacts):
    assert server_artifacts.export_missing
"""
# The first test's own work outlasts its timeout: that timeout must still fire, after the export.
TIMED_TESTS = """
import time

def test_over_its_timeout():
    time.sleep(3)

def test_exported(exported_artifacts):
    assert exported_artifacts.result.ok
"""
FAKE_FILES = ("bce.pt", "mse.pt")


@pytest.fixture
def fake_export(monkeypatch):
    r"""Replace the export by one that takes ``seconds`` (or raises ``error``); ``calls`` counts its runs."""

    class Fake:
        seconds = 0.0
        error = None
        calls = 0

        def __call__(self, out, on_artifact=None, **options):
            self.calls += 1
            if self.error is not None:
                raise self.error
            rows = []
            for file in FAKE_FILES:
                time.sleep(self.seconds / len(FAKE_FILES))
                rows.append(export.Row(file, "loss", "torchscript", ok=True))
                on_artifact(export.Progress(file, len(rows), len(FAKE_FILES), 0.0))
            return export.ExportResult(True, rows, {}, self.seconds)

    fake = Fake()
    monkeypatch.setattr(export, "export_losses", fake)
    monkeypatch.delenv("LOSS_SERVICE_TEST_ARTIFACTS", raising=False)
    return fake


def _session(pytester, *args, tests=INNER_TESTS, conftest_changes=""):
    pytester.makeconftest(CONFTEST.read_text() + conftest_changes)
    pytester.makepyfile(test_inner=tests)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


def test_runs_once_before_the_first_test_and_outside_its_timeout_printing_progress(pytester, fake_export):
    fake_export.seconds = 2.0  # past the inner tests' 1 s timeout
    result = _session(pytester, "--timeout", "1", conftest_changes="\nPROGRESS_EVERY_SECONDS = 0\n")
    result.assert_outcomes(passed=3)
    assert fake_export.calls == 1
    lines = result.outlines
    progress = [i for i, line in enumerate(lines) if line.startswith("export for the test session: 1/2 artifacts, ")]
    total = [i for i, line in enumerate(lines) if line.startswith("export for the test session: 2 artifacts in 2 s")]
    first_test = next(i for i, line in enumerate(lines) if line.startswith("test_inner.py"))
    assert len(progress) == 1 and len(total) == 1, lines
    assert progress[0] < total[0] < first_test, lines


def test_per_test_timeouts_still_time_the_tests_own_work(pytester, fake_export):
    fake_export.seconds = 2.0
    result = _session(pytester, "--timeout", "1", tests=TIMED_TESTS)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_over_its_timeout - Failed: Timeout*"])


@pytest.mark.parametrize("args, prebuilt", [(("-k", "without"), None), (("-k", "served"), "/prebuilt/artifacts")],
                         ids=["no test needs artifacts", "servers use a prebuilt folder"])
def test_no_export_when_no_selected_test_needs_it(pytester, fake_export, monkeypatch, args, prebuilt):
    if prebuilt:
        monkeypatch.setenv("LOSS_SERVICE_TEST_ARTIFACTS", prebuilt)
        # The inner test checks export_missing, false for a prebuilt folder: it fails, having run.
        _session(pytester, *args).assert_outcomes(failed=1)
    else:
        _session(pytester, *args).assert_outcomes(passed=1)
    assert fake_export.calls == 0


def test_a_failed_export_fails_each_test_that_needs_it_without_running_again(pytester, fake_export):
    fake_export.error = RuntimeError("no space left on device")
    result = _session(pytester)
    result.assert_outcomes(passed=1, errors=2)
    assert fake_export.calls == 1
    failure = "failed after 0 s: RuntimeError: no space left on device"
    assert result.outlines.count(f"export for the test session: {failure}") == 1  # then its traceback
    assert result.outlines.count(f"the session export {failure}") == 2  # the error of each test that needs it


def test_a_hung_export_is_stopped_at_its_time_limit(pytester, fake_export):
    fake_export.seconds = 60.0
    start = time.monotonic()
    result = _session(pytester, conftest_changes="\nSESSION_EXPORT_TIMEOUT_SECONDS = 1\n")
    assert time.monotonic() - start < 30
    result.assert_outcomes(passed=1, errors=2)
    assert fake_export.calls == 1
    assert result.outlines.count("the session export failed after 1 s: SessionExportTimedOut: not finished in 1 s") == 2
