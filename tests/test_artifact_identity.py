r"""Artifacts are what their manifest entries say: the loss and variant of each file, and (with a key)
the manifest's own HMAC signature.

Each test changes a private copy of the served folder (``server_artifacts``: the session export, or
``LOSS_SERVICE_TEST_ARTIFACTS``). A swapped file gets the sha256 of its new bytes in the manifest,
as someone "fixing" the checksum would do, so that only the identity checks can catch it.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loss_service import losses
from loss_service.export import ArtifactError, check_scripted, manifest
from loss_service.server.app import smoke_check
from loss_service.server.artifacts import prepare_artifacts
from loss_service.server.backends import EagerBackend, TorchScriptBackend

from .conftest import copy_artifacts

REPO = Path(__file__).resolve().parents[1]
KEY = "the right key"


@pytest.fixture(autouse=True)
def no_manifest_key(monkeypatch):
    monkeypatch.delenv(manifest.MANIFEST_KEY_VARIABLE, raising=False)


@pytest.fixture
def artifacts_copy(server_artifacts, tmp_path):
    return copy_artifacts(server_artifacts.folder, tmp_path / "artifacts")


def _edit_entry(folder, file, **changes):
    written = manifest.load(folder)
    entry = next(entry for entry in written["artifacts"] if entry["file"] == file)
    entry.update(changes)
    (folder / manifest.MANIFEST_NAME).write_text(json.dumps(written))


def _swap(folder, file, other):
    r"""``file`` gets ``other``'s bytes, and its manifest entry their sha256."""
    data = (folder / other).read_bytes()
    (folder / file).write_bytes(data)
    _edit_entry(folder, file, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _torchscript_start(folder):
    r"""What the start does with the TorchScript modules: load each (the smoke check) after the folder's checks."""
    loaded = prepare_artifacts(folder, export_missing=False)
    smoke_check({"eager": EagerBackend("cpu"), "torchscript": TorchScriptBackend("cpu", loaded.scripts)})
    return loaded


def test_the_untouched_folder_passes(artifacts_copy):
    loaded = _torchscript_start(artifacts_copy)
    assert loaded.failed == []
    assert sorted(loaded.scripts) == sorted(losses.names())
    assert len(loaded.graphs) == len([entry for entry in manifest.load(artifacts_copy)["artifacts"]
                                      if entry["format"] == "onnx"])


@pytest.mark.parametrize("file, other, difference", [
    # Same inputs and outputs: only the identity in the graph's metadata tells them apart.
    ("dice.onnx", "iou.onnx", "metadata loss_service.loss 'iou', expected 'dice'"),
    ("dice.onnx", "dice--mode=multilabel.onnx", "metadata loss_service.variant 'mode=multilabel', expected ''"),
    # Other inputs as well.
    ("focal.onnx", "cross_entropy.onnx", "inputs: unexpected [], missing [('gamma', 'float32', 0)"),
    ("focal--alpha=scalar.onnx", "focal.onnx",
     "inputs: unexpected [('alpha', 'float32', 1)], missing [('alpha', 'float32', 0)]"),
])
def test_a_swapped_graph_stops_the_start(artifacts_copy, file, other, difference):
    _swap(artifacts_copy, file, other)
    with pytest.raises(ArtifactError) as raised:
        prepare_artifacts(artifacts_copy, export_missing=False)
    message = str(raised.value)
    assert f"{artifacts_copy / file} is not the ONNX graph of" in message
    assert difference in message


def test_a_swapped_torchscript_module_stops_the_start(artifacts_copy):
    _swap(artifacts_copy, "focal.pt", "dice.pt")
    with pytest.raises(ArtifactError, match="focal.pt is not the TorchScript module of focal") as raised:
        _torchscript_start(artifacts_copy)
    assert "class __torch__.loss_service.losses.region.DiceLoss, expected " \
           "__torch__.loss_service.losses.focal.FocalLoss" in str(raised.value)


def test_a_module_without_the_methods_and_hyperparameters_is_refused():
    class Bare(torch.nn.Module):
        def forward(self, predictions: torch.Tensor) -> torch.Tensor:
            return predictions

    spec = losses.get("huber")
    with pytest.raises(ArtifactError) as raised:
        check_scripted(spec, torch.jit.script(Bare()), losses.build("huber"))
    message = str(raised.value)
    for difference in ("no method statistics", "no method reductions", "no float attribute delta",
                       "no buffer class_weight", "no str attribute reduction"):
        assert difference in message


def test_an_entry_naming_another_loss_stops_the_start(artifacts_copy):
    _edit_entry(artifacts_copy, "mse.pt", loss="l1")
    with pytest.raises(ArtifactError, match=r"mse.pt: its manifest entry says .*'l1'.*, the file name .*'mse'"):
        prepare_artifacts(artifacts_copy, export_missing=False)


def test_serve_exits_1_naming_a_swapped_module(artifacts_copy):
    _swap(artifacts_copy, "mse.pt", "l1.pt")
    result = subprocess.run(
        [sys.executable, "-m", "loss_service", "serve", "--no-export", "--port", "0", "--artifacts", str(artifacts_copy)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "mse.pt is not the TorchScript module of mse" in result.stderr


def _sign(folder):
    signature = manifest.signature((folder / manifest.MANIFEST_NAME).read_bytes(), KEY.encode())
    (folder / manifest.SIGNATURE_NAME).write_text(signature + "\n")


def test_a_signed_manifest_passes_with_its_key_and_is_signed_again_by_the_writer(artifacts_copy, monkeypatch):
    _sign(artifacts_copy)
    monkeypatch.setenv(manifest.MANIFEST_KEY_VARIABLE, KEY)
    before = prepare_artifacts(artifacts_copy, export_missing=False)
    written = manifest.load(artifacts_copy)
    manifest.write(artifacts_copy, [], written["opset"], {"test": "sign again"})
    after = prepare_artifacts(artifacts_copy, export_missing=False)
    assert sorted(after.graphs) == sorted(before.graphs) and sorted(after.scripts) == sorted(before.scripts)
    assert manifest.load(artifacts_copy)["run"] == {"test": "sign again"}


@pytest.mark.parametrize("change, message", [
    ("wrong key", "manifest.json: its HMAC does not match"),
    ("no signature", "manifest.json.hmac is missing"),
    ("edited manifest", "manifest.json: its HMAC does not match"),
])
def test_a_manifest_without_its_signature_stops_the_start(artifacts_copy, monkeypatch, change, message):
    _sign(artifacts_copy)
    monkeypatch.setenv(manifest.MANIFEST_KEY_VARIABLE, "another key" if change == "wrong key" else KEY)
    if change == "no signature":
        (artifacts_copy / manifest.SIGNATURE_NAME).unlink()
    if change == "edited manifest":
        _swap(artifacts_copy, "mse.onnx", "l1.onnx")
    with pytest.raises(ArtifactError, match=message):
        prepare_artifacts(artifacts_copy, export_missing=True)


def test_the_writer_does_not_sign_entries_it_cannot_trust(artifacts_copy, monkeypatch):
    # An unsigned (or forged) manifest's entries are dropped, not re-signed: the server exports them again.
    monkeypatch.setenv(manifest.MANIFEST_KEY_VARIABLE, KEY)
    manifest.write(artifacts_copy, [], manifest.load(artifacts_copy)["opset"], {})
    assert manifest.load(artifacts_copy)["artifacts"] == []
    assert prepare_artifacts(artifacts_copy, export_missing=False).failed != []
