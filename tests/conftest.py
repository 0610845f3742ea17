r"""Shared fixtures: ONE export of every artifact per test session, used by the export and server tests.

``exported_artifacts`` runs ``export.export_losses`` once (every loss, both formats, every ONNX
variant, ``standard`` verification) with ``--jobs 2`` worker processes into a session temporary
folder. ``tests/test_export.py`` checks that export (verification results, manifest, checksums);
the server and client tests serve it. ``server_artifacts`` is the folder the servers use:
``LOSS_SERVICE_TEST_ARTIFACTS`` when set (a prebuilt folder, used as it is), else the shared export.
Tests that need an export of their own (a broken artifact, CLI runs) export a few losses.
"""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

SESSION_EXPORT_JOBS = 2
SESSION_VERIFY_LEVEL = "standard"


@dataclass(frozen=True)
class ExportedArtifacts:
    folder: Path
    result: "object"  # export.ExportResult


@dataclass(frozen=True)
class ServerArtifacts:
    r"""The folder a test server loads, and whether the server may export into it."""

    folder: Path
    export_missing: bool


@pytest.fixture(scope="session")
def exported_artifacts(tmp_path_factory) -> ExportedArtifacts:
    from loss_service import export

    folder = tmp_path_factory.mktemp("artifacts")
    result = export.export_losses(folder, verify=SESSION_VERIFY_LEVEL, jobs=SESSION_EXPORT_JOBS)
    return ExportedArtifacts(folder, result)


@pytest.fixture(scope="session")
def server_artifacts(request) -> ServerArtifacts:
    given = os.environ.get("LOSS_SERVICE_TEST_ARTIFACTS")
    if given:
        return ServerArtifacts(Path(given), export_missing=False)
    # A source edit during the session makes the export stale; the server then re-exports.
    return ServerArtifacts(request.getfixturevalue("exported_artifacts").folder, export_missing=True)


def copy_artifacts(source: Path, target: Path, leave_out: Optional[list] = None) -> Path:
    r"""A private copy of an artifacts folder (for tests that change it), without ``leave_out`` files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*(leave_out or [])))
    return target
