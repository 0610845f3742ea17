r"""Export worker processes end with their parent, and ``serve`` exits promptly while exporting.

The exporter (``python -m loss_service.export --jobs 2``) and the server (its start-up export and its background
ONNX-variant export) run exports in spawn worker processes (:func:`export.process_pool`). The tests
start one of them as a subprocess, wait until its workers exist, then SIGKILL the parent (no
clean-up code of the parent runs) and check that every descendant -- workers and multiprocessing's
helpers such as the resource tracker -- has ended within :data:`ORPHAN_LIMIT_SECONDS`; or send
SIGTERM to an idle ``serve`` during an export and time its exit. Descendants are found by scanning
``/proc`` (Linux only).
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from .conftest import copy_artifacts

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parents[1]
# After the parent's end every descendant must have ended within this many seconds.
ORPHAN_LIMIT_SECONDS = 5.0
# From SIGTERM to the exit of an idle `serve` that is exporting (or SIGINT to `python -m loss_service.export`).
STOP_LIMIT_SECONDS = 3.0
# Until the worker processes exist, or a log event appears.
START_TIMEOUT_SECONDS = 60.0
# Once the workers exist: long enough for them to be inside an export (their imports take ~2 s here).
EXPORTING_SECONDS = 4.0
# Once the workers exist, before SIGTERM: they are starting their first export, which an exit that
# waits for it would wait for in full (5-10 s here).
STARTING_SECONDS = 1.0
POLL_SECONDS = 0.05
# Region-loss graphs, a few seconds each to export, so that an export is in progress at the signal.
REGION_DEFAULT_GRAPHS = ["dice.onnx", "iou.onnx", "tversky.onnx", "focal_tversky.onnx"]
REGION_VARIANTS = ["dice--mode=multiclass.onnx", "iou--mode=multiclass.onnx", "tversky--mode=multiclass.onnx"]


def _stat(pid: int) -> Optional[List[str]]:
    r"""The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); ``None`` if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


# Indices in _stat's fields (proc(5) numbers them from 1, the state is the 3rd).
STATE, PARENT, START_TIME = 0, 1, 19


def descendants(pid: int) -> Dict[int, str]:
    r"""Every live descendant of ``pid``: pid -> start time (tells a reused pid apart)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[STATE] not in "ZX":
                children.setdefault(int(fields[PARENT]), []).append(int(entry.name))
    found: Dict[int, str] = {}
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        fields = _stat(child)
        if fields is not None:
            found[child] = fields[START_TIME]
            stack.extend(children.get(child, []))
    return found


def survivors(processes: Dict[int, str]) -> Dict[int, str]:
    r"""The ``processes`` (pid -> start time) still running, pid -> command line (a zombie has ended)."""
    alive = {}
    for pid, start in processes.items():
        fields = _stat(pid)
        if fields is not None and fields[STATE] not in "ZX" and fields[START_TIME] == start:
            alive[pid] = _command_line(pid)
    return alive


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _workers(pid: int) -> Dict[int, str]:
    r"""The spawn worker processes among ``pid``'s descendants (not the resource tracker)."""
    return {child: start for child, start in descendants(pid).items() if "spawn_main" in _command_line(child)}


def _wait_for(condition: Callable[[], object], what: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(POLL_SECONDS)


def assert_ended(processes: Dict[int, str], after: str) -> None:
    r"""Every one of ``processes`` ends within ORPHAN_LIMIT_SECONDS."""
    deadline = time.monotonic() + ORPHAN_LIMIT_SECONDS
    while survivors(processes) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    left = survivors(processes)
    assert not left, f"still running {ORPHAN_LIMIT_SECONDS} s after {after}: {left}"


def _default_sigint() -> None:
    r"""SIGINT as a terminal's foreground process has it: a suite started in the background by a
    shell (``bash scripts/test-busy.sh &``) passes it on ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Started:
    r"""A ``python`` subprocess whose stderr lines (JSON log lines: their events) are collected on a thread."""

    def __init__(self, *arguments: str) -> None:
        self.process = subprocess.Popen([sys.executable, *arguments], cwd=REPO, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        self.lines: List[str] = []
        self.events: List[str] = []
        # Every descendant seen, for the clean-up: once the parent has ended they are no longer its descendants.
        self.family: Dict[int, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line).get("event"))
            except (ValueError, AttributeError):
                continue

    def output(self) -> str:
        return f"exit status {self.process.poll()}; stderr:\n" + "".join(self.lines)

    def wait_for_event(self, name: str) -> None:
        _wait_for(lambda: name in self.events or self.process.poll() is not None, f"event {name!r}")
        assert name in self.events, self.output()

    def wait_for_workers(self, count: int, settle: float) -> None:
        r"""Until ``count`` worker processes exist, then ``settle`` seconds more; records the family."""
        _wait_for(lambda: len(_workers(self.process.pid)) >= count or self.process.poll() is not None,
                  f"{count} worker processes")
        time.sleep(settle)
        assert self.process.poll() is None, self.output()
        self.family.update(descendants(self.process.pid))
        assert len(_workers(self.process.pid)) >= count, f"the workers ended early; the family: {self.family}"

    def signal_and_time(self, signum: int) -> float:
        r"""Seconds from sending ``signum`` to the process's exit (which must come within STOP_LIMIT_SECONDS + 60)."""
        signalled = time.monotonic()
        self.process.send_signal(signum)
        self.process.wait(STOP_LIMIT_SECONDS + 60)
        return time.monotonic() - signalled

    def kill_and_check_descendants(self) -> None:
        self.process.kill()
        self.process.wait(10)
        assert_ended(self.family, "the parent's SIGKILL")

    def end(self) -> None:
        r"""Kill the process and whatever it left (test clean-up)."""
        if self.process.poll() is None:
            self.family.update(descendants(self.process.pid))
            self.process.kill()
            self.process.wait(10)
        for pid in survivors(self.family):
            with contextlib.suppress(ProcessLookupError):  # it may end between the look and the kill
                os.kill(pid, signal.SIGKILL)


def _serve(server_artifacts, folder: Path, leave_out: List[str]) -> Started:
    copy_artifacts(server_artifacts.folder, folder, leave_out=leave_out)
    return Started("-m", "loss_service", "serve", "--host", "127.0.0.1", "--port", "0", "--artifacts", str(folder),
                   "--jobs", "2", "--grace-seconds", "0")


def _export(out: Path) -> Started:
    # Two region losses, every ONNX variant: 16 graphs, a few seconds each; the signal comes during the first ones.
    return Started("-m", "loss_service.export", "--out", str(out), "--loss", "dice", "--loss", "iou", "--format", "onnx",
                   "--verify", "quick", "--jobs", "2", "--no-progress")


def test_export_workers_end_when_the_exporter_is_killed(tmp_path):
    exporter = _export(tmp_path)
    try:
        exporter.wait_for_workers(2, EXPORTING_SECONDS)
        exporter.kill_and_check_descendants()
    finally:
        exporter.end()


def test_sigint_to_the_exporter_ends_it_and_its_workers_at_once(tmp_path):
    exporter = _export(tmp_path)
    try:
        exporter.wait_for_workers(2, EXPORTING_SECONDS)
        # To the parent alone (a Ctrl-C in a terminal reaches the workers too): it must not wait for the queue.
        seconds = exporter.signal_and_time(signal.SIGINT)
        assert exporter.process.returncode == -signal.SIGINT, exporter.output()
        assert seconds < STOP_LIMIT_SECONDS
        assert_ended(exporter.family, "the exporter's exit")
    finally:
        exporter.end()


# (the event of the export, the artifacts left out so that it has something to export, its worker count)
START_UP_EXPORT = ("exporting", REGION_DEFAULT_GRAPHS, 2)
BACKGROUND_EXPORT = ("background_export_started", REGION_VARIANTS, 1)
EXPORTS = pytest.mark.parametrize("export_event, leave_out, workers", [START_UP_EXPORT, BACKGROUND_EXPORT],
                                  ids=["start-up", "background"])


@EXPORTS
def test_server_export_workers_end_when_the_server_is_killed(server_artifacts, tmp_path, export_event, leave_out,
                                                             workers):
    server = _serve(server_artifacts, tmp_path / "artifacts", leave_out)
    try:
        server.wait_for_event(export_event)
        server.wait_for_workers(workers, EXPORTING_SECONDS)
        server.kill_and_check_descendants()
    finally:
        server.end()


@EXPORTS
def test_sigterm_during_an_export_exits_at_once(server_artifacts, tmp_path, export_event, leave_out, workers):
    server = _serve(server_artifacts, tmp_path / "artifacts", leave_out)
    try:
        server.wait_for_event(export_event)
        server.wait_for_workers(workers, STARTING_SECONDS)
        seconds = server.signal_and_time(signal.SIGTERM)
        print(f"\nexit {seconds:.2f} s after SIGTERM during the {export_event!r} export")
        assert server.process.returncode == 0, server.output()
        assert seconds < STOP_LIMIT_SECONDS
        assert "stopped" in server.events
        assert_ended(server.family, "the server's exit")
    finally:
        server.end()


# A parent that starts CHILD_SCRIPT (a worker stand-in; its stderr to <folder>/stderr), prints its
# pid and ends: at once, or once the child has called end_with_parent (<folder>/called exists).
PARENT_SCRIPT = r"""
import os, pathlib, subprocess, sys, time
child_script, parent_ends, platform, folder = sys.argv[1:]
with open(pathlib.Path(folder, "stderr"), "w") as errors:
    child = subprocess.Popen([sys.executable, "-c", child_script, str(os.getpid()), parent_ends, platform, folder],
                             stdout=subprocess.DEVNULL, stderr=errors)
print(child.pid, flush=True)
deadline = time.monotonic() + 60
while parent_ends == "after" and not pathlib.Path(folder, "called").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""
CHILD_SCRIPT = r"""
import os, pathlib, sys, time
from loss_service import export
parent, parent_ends, platform, folder = int(sys.argv[1]), *sys.argv[2:]
deadline = time.monotonic() + 60
while parent_ends == "before" and os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.01)
sys.platform = platform
export.end_with_parent(parent)
pathlib.Path(folder, "called").touch()
time.sleep(60)
"""


@pytest.mark.parametrize("parent_ends, platform", [("before", sys.platform), ("after", "elsewhere")],
                         ids=["parent-ended-before-the-call", "polling-fallback"])
def test_end_with_parent(tmp_path, parent_ends, platform):
    parent = subprocess.run([sys.executable, "-c", PARENT_SCRIPT, CHILD_SCRIPT, parent_ends, platform, str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert parent.returncode == 0, parent.stderr
    pid = int(parent.stdout)
    fields = _stat(pid)  # the child imports torch for a second or more before it calls end_with_parent
    child = {pid: fields[START_TIME]} if fields is not None else {}
    try:
        assert_ended(child, "its parent's exit")
        assert (tmp_path / "stderr").read_text() == ""
        # Ended before the call: end_with_parent exits at once. After: it returned, and the polling thread ended it.
        assert (tmp_path / "called").exists() == (parent_ends == "after")
    finally:
        for left in survivors(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(left, signal.SIGKILL)


def test_a_background_worker_that_dies_fails_its_export_alone(server_artifacts, tmp_path):
    r"""A variant whose export worker is killed (e.g. for memory) fails; the next one gets a new worker."""
    from loss_service.server.backends import BackendUnavailable
    from loss_service.server.background import VariantExporter

    files = ["focal--alpha=scalar.onnx", "cross_entropy--targets=probabilities.onnx"]
    folder = copy_artifacts(server_artifacts.folder, tmp_path / "artifacts", leave_out=files)
    opset = json.loads((folder / "manifest.json").read_text())["opset"]
    delivered = []
    exporter = VariantExporter(folder, files, lambda name, data: delivered.append(name), opset)
    futures = [exporter.request(name) for name in reversed(files)]  # files[0] goes first
    exporter.start()
    try:
        _wait_for(lambda: _workers(os.getpid()), "background export worker")
        time.sleep(STARTING_SECONDS)
        for pid in _workers(os.getpid()):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(BackendUnavailable, match="exporting focal--alpha=scalar.onnx failed"):
            futures[1].result(timeout=START_TIMEOUT_SECONDS)
        futures[0].result(timeout=START_TIMEOUT_SECONDS * 3)
        assert delivered == [files[1]] and (folder / files[1]).exists()
    finally:
        exporter.stop()
